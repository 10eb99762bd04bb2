// One transcription and one streamed transcription with the `openai` npm package.
// Usage: node transcribe.mjs BASE_URL API_KEY AUDIO_PATH  → one JSON line on stdout.
import fs from "node:fs";
import OpenAI from "openai";

const [baseURL, apiKey, path] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const transcription = await client.audio.transcriptions.create({
  file: fs.createReadStream(path),
  model: "whisper-1",
});
const stream = await client.audio.transcriptions.create({
  file: fs.createReadStream(path),
  model: "whisper-1",
  stream: true,
});
const events = [];
for await (const event of stream) events.push(event);
let error = null;
try {
  await client.audio.transcriptions.create({ file: fs.createReadStream(path), model: "no-such-model" });
} catch (err) {
  error = { name: err.constructor.name, status: err.status, code: err.code, param: err.param };
}
console.log(JSON.stringify({ text: transcription.text, usage: transcription.usage, events, error }));
