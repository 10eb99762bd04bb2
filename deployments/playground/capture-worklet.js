// Microphone capture on the audio thread: hands the page the first channel in chunks of
// `chunk` samples (about 100 ms), as Float32Array at the AudioContext's own rate; the page
// converts them to 16-bit PCM and sends them (encoding=linear16, sample_rate=that rate).
class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buffer = new Float32Array(this.chunk);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    let offset = 0;
    while (offset < input.length) {
      const n = Math.min(input.length - offset, this.chunk - this.filled);
      this.buffer.set(input.subarray(offset, offset + n), this.filled);
      this.filled += n;
      offset += n;
      if (this.filled === this.chunk) {
        this.port.postMessage(this.buffer, [this.buffer.buffer]);
        this.buffer = new Float32Array(this.chunk);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
