// Microphone capture for the gateway console: an AudioWorklet that turns the
// AudioContext's float samples (at its own sampleRate, 44.1/48 kHz) into LINEAR16
// (16-bit little-endian mono PCM) at processorOptions.targetRate (the Init config's
// sttSampleRate), by linear interpolation, and posts 100 ms chunks (ArrayBuffers).
class Linear16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const target = options.processorOptions.targetRate;
    this.step = sampleRate / target; // input samples per output sample
    this.pos = 0;                    // read position in the current input block
    this.size = Math.round(target / 10); // samples per chunk
    this.chunk = new Int16Array(this.size);
    this.n = 0;
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0]; // first channel (the stream is mono)
    if (!ch) return true;
    let pos = this.pos;
    for (; pos < ch.length; pos += this.step) {
      const i = Math.floor(pos);
      const a = ch[i], b = i + 1 < ch.length ? ch[i + 1] : a;
      const v = Math.max(-1, Math.min(1, a + (b - a) * (pos - i)));
      this.chunk[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
      if (this.n === this.size) { // the buffer is transferred: a new one for the next chunk
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.size);
        this.n = 0;
      }
    }
    this.pos = pos - ch.length;
    return true;
  }
}

registerProcessor('linear16-capture', Linear16Capture);
