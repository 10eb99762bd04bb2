// Hark playground: plain JavaScript, no build step and no dependency, so that the page works
// offline from the service's own package. Every request goes to the service that served the
// page (paths relative to it, so a route prefix works too).
"use strict";

const $ = (id) => document.getElementById(id);
const SERVICE = new URL("../", location.href); // the page lives at <service>/ui/
const KEY_ITEM = "hark.key";
const LOW_CONFIDENCE = 0.6;

function serviceUrl(path) {
  return new URL(path, SERVICE).toString();
}

// ---- the key: typed once, kept for this tab only, never put in a URL --------------------------

const keyInput = $("key");
keyInput.value = sessionStorage.getItem(KEY_ITEM) || "";
keyInput.addEventListener("input", () => sessionStorage.setItem(KEY_ITEM, keyInput.value.trim()));
$("key-form").addEventListener("submit", (e) => e.preventDefault());
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  keyInput.value = "";
  keyInput.focus();
});

function currentKey() {
  return keyInput.value.trim();
}

function authHeaders() {
  return { Authorization: `Token ${currentKey()}` };
}

// ---- errors, as the API says them --------------------------------------------------------------

function describeError(status, body) {
  if (body && typeof body.error === "string") {
    let text = body.error;
    if (body.code) text += status ? ` (${body.code}, HTTP ${status})` : ` (${body.code})`; // status 0: on the stream
    if (body.retry_after !== undefined) text += `\nTry again in ${body.retry_after} s.`;
    if (Array.isArray(body.supported_formats)) text += `\nSupported formats: ${body.supported_formats.join(", ")}.`;
    return text;
  }
  if (status === 0) return "Could not reach the service (network error or the connection was closed).";
  return `The service answered HTTP ${status} without an error message.`;
}

function showError(box, text) {
  box.textContent = text;
  box.hidden = !text;
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function randomId() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function seconds(value, digits = 1) {
  return `${Number(value).toFixed(digits)} s`;
}

// ---- file: pick or drop, options, upload with progress ------------------------------------------

const fileInput = $("file");
const drop = $("drop");
const transcribeButton = $("transcribe");
let chosenFile = null;
let playerUrl = null;

function choose(file) {
  chosenFile = file || null;
  $("drop-text").textContent = file ? `${file.name} (${(file.size / 1e6).toFixed(2)} MB)` : "Drop an audio file here, or choose one";
  transcribeButton.disabled = !file;
}

fileInput.addEventListener("change", () => choose(fileInput.files[0]));
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
});
$("diarize").addEventListener("change", (e) => {
  $("num-speakers").disabled = !e.target.checked;
});

function listenQuery() {
  const q = new URLSearchParams();
  const language = $("language").value.trim();
  if (language) q.set("language", language);
  q.set("punctuate", $("punctuate").checked);
  q.set("timestamps", $("timestamps").checked);
  if ($("diarize").checked) {
    q.set("diarize", "true");
    const count = $("num-speakers").value.trim();
    if (count) q.set("num_speakers", count);
  }
  return q;
}

$("file-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (chosenFile) upload(chosenFile);
});

function upload(file) {
  const status = $("file-status");
  const bar = $("upload-bar");
  const errorBox = $("file-error");
  showError(errorBox, "");
  $("result").hidden = true;
  $("file-progress").hidden = false;
  bar.value = 0;
  bar.removeAttribute("value"); // indeterminate until the first progress event
  status.textContent = "Uploading…";
  transcribeButton.disabled = true;

  const form = new FormData();
  form.append("audio", file, file.name);
  const xhr = new XMLHttpRequest();
  const started = performance.now();
  let uploaded = null;
  let ticker = null;

  xhr.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    bar.value = e.loaded / e.total;
    status.textContent = `Uploading… ${Math.round((100 * e.loaded) / e.total)} %`;
  });
  xhr.upload.addEventListener("load", () => {
    uploaded = performance.now();
    bar.value = 1;
    const tick = () => {
      status.textContent = `Transcribing… ${Math.round((performance.now() - uploaded) / 1000)} s`;
    };
    tick();
    ticker = setInterval(tick, 1000);
  });
  xhr.addEventListener("loadend", () => {
    clearInterval(ticker);
    transcribeButton.disabled = !chosenFile;
    $("file-progress").hidden = true;
    const body = parseJson(xhr.responseText);
    if (xhr.status !== 200) {
      showError(errorBox, describeError(xhr.status, body));
      return;
    }
    const processingS = (performance.now() - (uploaded ?? started)) / 1000;
    renderResult(body, file, xhr.getResponseHeader("Hark-Job-Id"), processingS);
  });
  xhr.open("POST", serviceUrl(`v1/listen?${listenQuery()}`));
  xhr.setRequestHeader("Authorization", authHeaders().Authorization);
  // Run as an idempotent job: a retried upload is not transcribed twice, and the job keeps the
  // result that the SRT/VTT/TXT downloads are rendered from.
  xhr.setRequestHeader("Idempotency-Key", `playground-${randomId()}`);
  xhr.send(form);
}

// ---- the result ---------------------------------------------------------------------------------

const player = $("player");

function isPunctuation(word) {
  return word.start === word.end && /^[\p{P}\p{S}]+$/u.test(word.word);
}

function speakerName(label) {
  const m = /^SPEAKER_(\d+)$/.exec(label || "");
  return m ? `Speaker ${Number(m[1]) + 1}` : label;
}

function turnElement(label, order) {
  const turn = document.createElement("div");
  turn.className = "turn";
  if (label) {
    if (!order.has(label)) order.set(label, order.size);
    turn.classList.add(`spk-${order.get(label) % 8}`);
    turn.dataset.speaker = label;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = speakerName(label);
    turn.append(who);
  }
  return turn;
}

function wordButton(word) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "w";
  b.textContent = word.word;
  b.dataset.start = word.start;
  b.dataset.end = word.end;
  const confidence = word.confidence ?? 1;
  if (confidence < LOW_CONFIDENCE) b.classList.add("low");
  b.title = `${word.start.toFixed(2)}–${word.end.toFixed(2)} s · confidence ${confidence.toFixed(2)}`;
  return b;
}

function renderTranscript(result) {
  const box = $("transcript");
  box.replaceChildren();
  const order = new Map();
  const words = result.words || [];
  if (words.length) {
    let turn = null;
    let label;
    for (const word of words) {
      if (isPunctuation(word) && turn) {
        turn.append(word.word);
        continue;
      }
      if (!turn || (word.speaker || null) !== label) {
        label = word.speaker || null;
        turn = turnElement(label, order);
        box.append(turn);
      }
      if (turn.querySelector(".w")) turn.append(" ");
      turn.append(wordButton(word));
    }
  } else if (result.speakers && result.speakers.length) {
    for (const s of result.speakers) {
      const turn = turnElement(s.speaker, order);
      turn.append(s.text);
      box.append(turn);
    }
  } else {
    const turn = turnElement(null, order);
    turn.append(result.text || "(no speech)");
    box.append(turn);
  }
  return order.size;
}

function renderFigures(result, jobId, processingS, speakers) {
  const rows = [
    ["Language", result.language],
    ["Duration", seconds(result.duration)],
    ["Confidence", Number(result.confidence).toFixed(2)],
    ["Processing", seconds(processingS)],
    ["Real-time factor", result.duration > 0 ? (processingS / result.duration).toFixed(3) : "–"],
  ];
  if (speakers) rows.push(["Speakers", String(speakers)]);
  if (jobId) rows.push(["Job", jobId]);
  rows.push(["Request", result.request_id]);
  const dl = $("figures");
  dl.replaceChildren();
  for (const [name, value] of rows) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value ?? "–";
    dd.dataset.figure = name.toLowerCase().replaceAll(" ", "-");
    div.append(dt, dd);
    dl.append(div);
  }
}

function downloadLink(label, name) {
  const a = document.createElement("a");
  a.textContent = label;
  a.download = name;
  a.dataset.format = label.toLowerCase();
  return a;
}

async function renderDownloads(result, jobId, base) {
  const nav = $("downloads");
  for (const a of nav.querySelectorAll("a")) URL.revokeObjectURL(a.href);
  nav.replaceChildren();
  const json = downloadLink("JSON", `${base}.json`);
  json.href = URL.createObjectURL(new Blob([JSON.stringify(result, null, 2)], { type: "application/json" }));
  nav.append(json);
  if (!jobId) return;
  // The other formats are rendered by the service from the job's stored result.
  await Promise.all(
    [["SRT", "srt", "srt"], ["VTT", "vtt", "vtt"], ["TXT", "text", "txt"]].map(async ([label, format, ext]) => {
      const a = downloadLink(label, `${base}.${ext}`);
      a.classList.add("pending");
      nav.append(a);
      try {
        const r = await fetch(serviceUrl(`v1/jobs/${encodeURIComponent(jobId)}?format=${format}`), { headers: authHeaders() });
        if (!r.ok) throw new Error(describeError(r.status, parseJson(await r.text())));
        a.href = URL.createObjectURL(await r.blob());
        a.classList.remove("pending");
      } catch (err) {
        a.title = `Not available: ${err.message}`;
      }
    }),
  );
  nav.dataset.ready = "true";
}

function renderResult(result, file, jobId, processingS) {
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = URL.createObjectURL(file);
  player.src = playerUrl;
  const speakers = renderTranscript(result);
  renderFigures(result, jobId, processingS, speakers);
  $("downloads").dataset.ready = "false";
  $("result").hidden = false;
  renderDownloads(result, jobId, file.name.replace(/\.[^.]+$/, "") || "transcript");
}

$("transcript").addEventListener("click", (e) => {
  const word = e.target.closest("button.w");
  if (!word) return;
  for (const old of document.querySelectorAll(".w.now")) old.classList.remove("now");
  word.classList.add("now");
  player.currentTime = Number(word.dataset.start);
  player.play().catch(() => {}); // playback may be refused (no audio output); the seek stands
});

// ---- live: microphone → /v1/listen/stream ---------------------------------------------------------

const micButton = $("mic");
const liveStatus = $("live-status");
let live = null;

micButton.addEventListener("click", () => (live ? live.stop() : startLive()));

function setMic(on) {
  micButton.setAttribute("aria-pressed", String(on));
  micButton.textContent = on ? "Stop" : "Start microphone";
}

async function explainRefusal(errorBox) {
  // A browser is not shown why a WebSocket handshake was refused; ask the API about the key.
  try {
    const r = await fetch(serviceUrl("v1/jobs/job_playground_key_check"), { headers: authHeaders() });
    if (r.status === 401) {
      showError(errorBox, describeError(r.status, parseJson(await r.text())));
      return;
    }
  } catch {
    // fall through to the general sentence
  }
  showError(errorBox, "The service refused the stream before it opened: the key may be over its limits, an option (the language) may be wrong, or the service is busy.");
}

async function startLive() {
  const errorBox = $("live-error");
  showError(errorBox, "");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError(errorBox, "This browser gives microphones only to secure pages: open the playground over https or on localhost.");
    return;
  }
  const session = { stopped: false, opened: false, errored: false, pending: [], capturedS: 0 };
  session.stop = () => {
    session.stopped = true; // pressed again while the microphone was being asked for
    cleanup(session);
  };
  live = session;
  setMic(true);
  $("finals").textContent = "";
  $("interim").textContent = "";
  liveStatus.textContent = "Asking for the microphone…";
  try {
    session.media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    session.ctx = new AudioContext();
    await session.ctx.audioWorklet.addModule("capture-worklet.js");
    if (session.stopped) throw new Error("stopped");
  } catch (err) {
    if (session.stopped) {
      release(session);
      return;
    }
    cleanup(session);
    showError(errorBox, `No microphone: ${err.message || err}`);
    return;
  }
  const rate = session.ctx.sampleRate;
  const q = new URLSearchParams({ encoding: "linear16", sample_rate: String(rate), channels: "1", interim_results: "true" });
  const language = $("live-language").value.trim();
  if (language) q.set("language", language);
  const url = serviceUrl(`v1/listen/stream?${q}`).replace(/^http/, "ws");
  try {
    session.ws = new WebSocket(url, ["token", currentKey()]);
  } catch (err) {
    cleanup(session);
    showError(errorBox, `The key cannot be sent to the stream: ${err.message}`);
    return;
  }
  const ws = session.ws;
  ws.binaryType = "arraybuffer";

  const source = session.ctx.createMediaStreamSource(session.media);
  const node = new AudioWorkletNode(session.ctx, "pcm-capture", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    processorOptions: { chunk: Math.round(rate / 10) },
  });
  source.connect(node);
  node.port.onmessage = (e) => {
    const samples = e.data;
    let sum = 0;
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      sum += s * s;
      pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
    }
    $("level").value = Math.min(1, Math.sqrt(sum / samples.length) * 4);
    session.capturedS += samples.length / rate;
    liveStatus.dataset.capturedS = session.capturedS.toFixed(1);
    if (ws.readyState === WebSocket.OPEN) ws.send(pcm.buffer);
    else if (ws.readyState === WebSocket.CONNECTING) session.pending.push(pcm.buffer);
  };
  session.node = node;
  ws.onopen = () => {
    session.opened = true;
    for (const buffer of session.pending.splice(0)) ws.send(buffer);
    session.ticker = setInterval(() => {
      if (!session.stopped) liveStatus.textContent = `Listening… ${Math.round(session.capturedS)} s`;
    }, 500);
  };
  ws.onmessage = (e) => {
    const m = parseJson(e.data);
    if (!m) return;
    if (m.type === "Results") {
      if (m.is_final) {
        if (m.text) {
          const finals = $("finals");
          finals.textContent = finals.textContent ? `${finals.textContent} ${m.text}` : m.text;
        }
        $("interim").textContent = "";
      } else {
        $("interim").textContent = m.text;
      }
    } else if (m.type === "Metadata") {
      liveStatus.textContent = `Stopped after ${seconds(m.duration)} of audio.`;
      liveStatus.dataset.state = "done";
    } else if (m.type === "Error") {
      session.errored = true;
      showError(errorBox, describeError(0, m));
    }
  };
  ws.onclose = (e) => {
    release(session);
    clearInterval(session.ticker);
    if (!session.opened && !session.stopped) {
      liveStatus.textContent = "";
      explainRefusal(errorBox);
    } else if (e.code !== 1000 && !session.errored) {
      showError(errorBox, `The stream closed unexpectedly (code ${e.code}${e.reason ? `: ${e.reason}` : ""}).`);
    }
    if (liveStatus.dataset.state !== "done") {
      liveStatus.dataset.state = "closed";
      if (session.opened) liveStatus.textContent = "Stream closed.";
    }
    cleanup(session);
  };

  session.stop = () => {
    // Stop the microphone, then ask the service to finish: the last words still arrive.
    session.stopped = true;
    release(session);
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "CloseStream" }));
      liveStatus.textContent = "Finishing…";
    } else {
      ws.close();
    }
    setMic(false);
    micButton.disabled = true; // until the service has closed the stream
  };
  liveStatus.dataset.state = "live";
  liveStatus.dataset.capturedS = "0";
  liveStatus.textContent = "Connecting…";
}

function release(session) {
  session.node?.disconnect();
  session.media?.getTracks().forEach((t) => t.stop());
  if (session.ctx && session.ctx.state !== "closed") session.ctx.close();
  $("level").value = 0;
}

function cleanup(session) {
  release(session);
  if (live === session) live = null;
  setMic(false);
  micButton.disabled = false;
}
