// The microphone's AudioWorklet (see startRecording in app.js): hands the page the samples of its one
// (mono) input in blocks of 4096; "flush" sends the partial block. Its output stays silent.
class PcmRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(4096);
    this.n = 0;
    this.port.onmessage = () => this.flush();
  }

  flush() {
    if (this.n) this.port.postMessage(this.block.slice(0, this.n));
    this.n = 0;
  }

  process(inputs) {
    const samples = inputs[0]?.[0];
    if (!samples) return true;
    for (let i = 0; i < samples.length; i++) {
      this.block[this.n++] = samples[i];
      if (this.n === this.block.length) this.flush();
    }
    return true;
  }
}

registerProcessor("pcm-recorder", PcmRecorder);
