// onnx-chat's chat page. Talks to this server's OpenAI-compatible API like any client: lists
// /v1/models, streams /v1/chat/completions (SSE) and keeps the conversation in memory. Media travel
// inline: images as data: URLs, audio as base64 (microphone recordings are encoded to WAV here,
// since the server decodes WAV/FLAC/MP3/OGG but not the WebM/Opus of MediaRecorder).

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), empty: $("empty"), model: $("model"), newChat: $("new-chat"),
  form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  file: $("file"), attach: $("attach"), record: $("record"), attachments: $("attachments"),
  status: $("status"), system: $("system"),
  temperature: $("temperature"), topP: $("top_p"), maxTokens: $("max_tokens"), seed: $("seed"),
  thinking: $("thinking"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), key: $("key"), keyReason: $("key-reason"),
  keyCancel: $("key-cancel"),
};

const KEY_STORAGE = "onnx-chat.api-key";
const MODEL_STORAGE = "onnx-chat.model";
const MAX_RECORDING_S = 30; // Gemma-3n hears at most 30 s of audio

const state = {
  history: [],   // the OpenAI messages of the conversation so far (the system prompt is added per request)
  pending: [],   // attachments of the next message: {kind, name, url, dataUrl, format}
  controller: null,
  conversation: 0, // bumped by "New chat", so that a stopped answer lands in the conversation it belongs to
  blobUrls: [],  // previews shown in the log, released on "New chat"
};

// ---- API ----------------------------------------------------------------------------------------

class ApiError extends Error {}

async function errorMessage(resp) {
  const text = await resp.text().catch(() => "");
  try {
    const msg = JSON.parse(text)?.error?.message;
    if (msg) return msg;
  } catch { /* not JSON */ }
  return text.trim() || `HTTP ${resp.status} ${resp.statusText}`;
}

/** fetch with the stored API key; a 401 asks for a key and retries until one works or the user gives up. */
async function api(path, init = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = { ...init.headers, ...(key ? { authorization: `Bearer ${key}` } : {}) };
    const resp = await fetch(path, { ...init, headers });
    if (resp.status !== 401) return resp;
    const msg = await errorMessage(resp);
    if (!(await askKey(msg))) throw new ApiError(msg);
  }
}

let keyPrompt = null; // one dialog at a time, shared by concurrent callers
function askKey(reason) {
  keyPrompt ??= new Promise((resolve) => {
    ui.keyReason.textContent = reason;
    ui.key.value = "";
    const done = (ok) => {
      ui.keyForm.removeEventListener("submit", onSubmit);
      ui.keyCancel.removeEventListener("click", onCancel);
      ui.keyDialog.removeEventListener("cancel", onCancel);
      ui.keyDialog.close();
      keyPrompt = null;
      resolve(ok);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const key = ui.key.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      done(true);
    };
    const onCancel = (e) => { e.preventDefault(); done(false); };
    ui.keyForm.addEventListener("submit", onSubmit);
    ui.keyCancel.addEventListener("click", onCancel);
    ui.keyDialog.addEventListener("cancel", onCancel);
    ui.keyDialog.showModal();
    ui.key.focus();
  });
  return keyPrompt;
}

/** The `data:` payloads of a Server-Sent Events body, as strings. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const boundary = /\r?\n\r?\n/;
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let m;
    while ((m = boundary.exec(buf))) {
      const event = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      const data = event.split(/\r?\n/)
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5));
      if (data.length) yield data.join("\n");
    }
  }
}

async function loadModels() {
  try {
    const resp = await api("/v1/models");
    if (!resp.ok) throw new ApiError(await errorMessage(resp));
    const ids = (await resp.json()).data.map((m) => m.id);
    const saved = localStorage.getItem(MODEL_STORAGE);
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id, false, id === saved)));
    if (!ids.length) setStatus("This server serves no model yet.", "error");
    else setStatus("");
  } catch (e) {
    ui.model.replaceChildren(new Option("(no models)", ""));
    setStatus(`Could not list the models: ${e.message}`, "error");
  }
}

// ---- conversation -------------------------------------------------------------------------------

function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.className = `status ${kind}`;
}

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function append(node) {
  const stick = nearBottom();
  ui.empty.hidden = true;
  ui.log.append(node);
  if (stick) ui.log.scrollTop = ui.log.scrollHeight;
}

function h(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c != null));
  return node;
}

function mediaView(a) {
  if (a.kind === "image") return h("img", { src: a.url, alt: a.name, title: a.name });
  return h("audio", { src: a.url, controls: true, title: a.name, ariaLabel: a.name });
}

function renderUser(text, attachments) {
  const media = attachments.length ? h("div", { className: "media" }, ...attachments.map(mediaView)) : null;
  append(h("article", { className: "msg user", ariaLabel: "You" },
    media, text ? h("div", { className: "text" }, text) : null));
}

function renderAssistant() {
  // The model's thoughts (reasoning_content), when it thinks: collapsed above the answer.
  const thoughtsText = h("div");
  const thoughts = h("details", { className: "thoughts" }, h("summary", {}, "Thoughts"), thoughtsText);
  thoughts.hidden = true;
  const text = h("div", { className: "text" });
  const meta = h("p", { className: "meta" });
  const node = h("article", { className: "msg assistant", ariaLabel: "Assistant" }, thoughts, text, meta);
  node.dataset.state = "streaming";
  node.setAttribute("aria-busy", "true");
  append(node);
  return { node, text, meta, thoughts, thoughtsText };
}

function params() {
  const num = (input, int) => {
    if (input.value.trim() === "") return undefined; // out-of-range values go through: the API says what is wrong
    const v = int ? parseInt(input.value, 10) : parseFloat(input.value);
    return Number.isFinite(v) ? v : undefined;
  };
  const p = {
    temperature: num(ui.temperature), top_p: num(ui.topP),
    max_tokens: num(ui.maxTokens, true), seed: num(ui.seed, true),
  };
  return Object.fromEntries(Object.entries(p).filter(([, v]) => v !== undefined));
}

function toPart(a) {
  if (a.kind === "image") return { type: "image_url", image_url: { url: a.dataUrl } };
  return { type: "input_audio", input_audio: { data: a.dataUrl.slice(a.dataUrl.indexOf(",") + 1), format: a.format } };
}

function stats(t0, tFirst, tEnd, usage, tokens, finish) {
  const n = usage?.completion_tokens ?? tokens;
  const parts = [usage ? `${usage.prompt_tokens} prompt + ${n} tokens` : `${n} tokens`];
  if (tFirst != null) {
    const decode = (tEnd - tFirst) / 1000;
    if (n > 1 && decode > 0) parts.push(`${((n - 1) / decode).toFixed(1)} tokens/s`);
    parts.push(`first token ${Math.round(tFirst - t0)} ms`);
  }
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : `finish: ${finish}`);
  return parts.join(" · ");
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.form.setAttribute("aria-busy", String(busy));
}

async function send() {
  if (state.controller) return;
  const text = ui.input.value;
  const attachments = state.pending;
  if (!text.trim() && !attachments.length) return;
  if (!ui.model.value) { setStatus("No model to talk to: the server lists none.", "error"); return; }
  // Media first, then the text: the order the model's chat template expects and the goldens use.
  const parts = attachments.map(toPart);
  if (text) parts.push({ type: "text", text });
  const userMsg = { role: "user", content: attachments.length ? parts : text };
  renderUser(text, attachments);
  state.blobUrls.push(...attachments.map((a) => a.url));
  state.pending = [];
  renderAttachments();
  ui.input.value = "";
  autosize();

  const messages = ui.system.value.trim() ? [{ role: "system", content: ui.system.value }] : [];
  messages.push(...state.history, userMsg);
  const body = {
    model: ui.model.value, messages, stream: true, stream_options: { include_usage: true },
    return_token_ids: true, // this server's extension: exact token counts, even for a stopped answer
    ...params(),
  };
  if (ui.thinking.checked) body.chat_template_kwargs = { enable_thinking: true };
  const view = renderAssistant();
  const controller = new AbortController();
  const conversation = state.conversation;
  state.controller = controller;
  setBusy(true);
  if (document.activeElement === ui.send || document.activeElement === document.body) ui.input.focus();
  setStatus("Generating…");
  const t0 = performance.now();
  let tFirst = null, answer = "", thoughts = "", tokens = 0, usage = null, finish = null, ended = false;
  const finishView = (st, metaText) => {
    view.node.dataset.state = st;
    view.node.removeAttribute("aria-busy");
    view.meta.textContent = metaText;
  };
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new ApiError(await errorMessage(resp));
    for await (const data of sseData(resp.body)) {
      if (data === "[DONE]") { ended = true; break; }
      const ev = JSON.parse(data);
      if (ev.error) throw new ApiError(ev.error.message);
      if (ev.usage) usage = ev.usage;
      const choice = ev.choices?.[0];
      if (choice?.finish_reason) finish = choice.finish_reason;
      const ids = choice?.delta?.token_ids?.length ?? 0;
      const delta = choice?.delta?.content;
      const thought = choice?.delta?.reasoning_content;
      if (ids || delta || thought) tFirst ??= performance.now();
      tokens += ids;
      view.node.dataset.tokens = tokens;
      if (thought) {
        thoughts += thought;
        view.thoughts.hidden = false;
        view.thoughtsText.textContent = thoughts;
      }
      if (delta) {
        answer += delta;
        const stick = nearBottom();
        view.text.textContent = answer;
        if (stick) ui.log.scrollTop = ui.log.scrollHeight;
      }
    }
    if (!ended) throw new ApiError("The answer stopped before its end (the connection closed).");
    if (conversation === state.conversation) state.history.push(userMsg, { role: "assistant", content: answer });
    const line = stats(t0, tFirst, performance.now(), usage, tokens, finish);
    finishView("done", line);
    setStatus("");
  } catch (e) {
    if (controller.signal.aborted) {
      // Keep what arrived: the next turn continues from it.
      if (conversation === state.conversation) state.history.push(userMsg, { role: "assistant", content: answer });
      finishView("stopped", `Stopped. ${stats(t0, tFirst, performance.now(), null, tokens, null)}`);
      setStatus("Stopped.");
    } else {
      // The turn is not part of the conversation; its words go back to the composer to retry.
      const msg = e instanceof ApiError ? e.message : `Request failed: ${e.message}`;
      view.node.classList.add("error");
      view.node.setAttribute("role", "alert");
      view.text.textContent = answer ? `${answer}\n\n${msg}` : msg;
      finishView("error", "");
      setStatus(msg, "error");
      if (!ui.input.value && !state.pending.length) {
        ui.input.value = text;
        state.pending = attachments;
        renderAttachments();
        autosize();
      }
    }
  } finally {
    state.controller = null;
    setBusy(false);
    if (document.activeElement === document.body || document.activeElement === ui.stop) ui.input.focus();
  }
}

function stop() {
  state.controller?.abort();
}

function newChat() {
  stop();
  state.conversation += 1;
  state.history = [];
  for (const u of state.blobUrls) URL.revokeObjectURL(u);
  state.blobUrls = [];
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  setStatus("");
  ui.input.focus();
}

// ---- attachments --------------------------------------------------------------------------------

const AUDIO_EXT = /\.(wav|flac|mp3|ogg|oga)$/i;

function audioFormat(file) {
  const ext = file.name.match(AUDIO_EXT)?.[1]?.toLowerCase();
  if (ext) return ext === "oga" ? "ogg" : ext;
  const sub = file.type.split("/")[1] ?? "";
  return { mpeg: "mp3", "x-wav": "wav", wave: "wav", "x-flac": "flac" }[sub] ?? sub;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image"
      : file.type.startsWith("audio/") || AUDIO_EXT.test(file.name) ? "audio" : null;
    if (!kind) { setStatus(`${file.name}: not an image or an audio file.`, "error"); continue; }
    const dataUrl = await readDataUrl(file);
    state.pending.push({
      kind, name: file.name || kind, url: URL.createObjectURL(file), dataUrl,
      format: kind === "audio" ? audioFormat(file) : undefined,
    });
  }
  renderAttachments();
}

function renderAttachments() {
  ui.attachments.replaceChildren(...state.pending.map((a, i) => {
    const remove = h("button", {
      type: "button", className: "remove", textContent: "×", ariaLabel: `Remove ${a.name}`, title: `Remove ${a.name}`,
    });
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(a.url);
      state.pending.splice(i, 1);
      renderAttachments();
      ui.input.focus();
    });
    return h("li", { className: a.kind }, mediaView(a), remove);
  }));
}

// ---- microphone (PCM through an AudioWorklet, encoded to 16-bit mono WAV) ------------------------

let recording = null;

function wavBlob(chunks, rate) {
  const n = chunks.reduce((s, c) => s + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * n);
  const v = new DataView(buf);
  const str = (o, s) => [...s].forEach((ch, i) => v.setUint8(o + i, ch.charCodeAt(0)));
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) {
    for (const x of c) {
      const s = Math.max(-1, Math.min(1, x));
      v.setInt16(o, s < 0 ? s * 0x8000 : s * 0x7fff, true);
      o += 2;
    }
  }
  return new Blob([buf], { type: "audio/wav" });
}

async function startRecording() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  let ctx, source;
  try {
    // 16 kHz is what the model hears; browsers that cannot resample the microphone use their own rate.
    ctx = new AudioContext({ sampleRate: 16000 });
    source = ctx.createMediaStreamSource(stream);
  } catch {
    await ctx?.close();
    ctx = new AudioContext();
    source = ctx.createMediaStreamSource(stream);
  }
  await ctx.audioWorklet.addModule("/ui/recorder.js");
  const node = new AudioWorkletNode(ctx, "pcm-recorder", { channelCount: 1, channelCountMode: "explicit" });
  const chunks = [];
  node.port.onmessage = (e) => chunks.push(e.data);
  source.connect(node).connect(ctx.destination); // the node outputs silence; the connection keeps it pulled
  const started = performance.now();
  const timer = setInterval(() => {
    const s = (performance.now() - started) / 1000;
    setStatus(`Recording… ${s.toFixed(0)} s (press ● again to stop)`);
    if (s >= MAX_RECORDING_S) stopRecording();
  }, 250);
  recording = { stream, ctx, node, chunks, timer };
  ui.record.setAttribute("aria-pressed", "true");
  ui.record.title = "Stop recording";
  setStatus("Recording…");
}

async function stopRecording() {
  const r = recording;
  if (!r) return;
  recording = null;
  clearInterval(r.timer);
  r.node.port.postMessage("flush");
  await new Promise((resolve) => setTimeout(resolve, 50)); // the last partial block
  r.stream.getTracks().forEach((t) => t.stop());
  r.node.disconnect();
  await r.ctx.close();
  ui.record.setAttribute("aria-pressed", "false");
  ui.record.title = "Record from the microphone";
  const stamp = new Date().toTimeString().slice(0, 8).replaceAll(":", "");
  const file = new File([wavBlob(r.chunks, r.ctx.sampleRate)], `recording-${stamp}.wav`, { type: "audio/wav" });
  await addFiles([file]);
  setStatus("Recording attached.");
}

async function toggleRecording() {
  try {
    if (recording) await stopRecording();
    else await startRecording();
  } catch (e) {
    recording = null;
    setStatus(`Microphone: ${e.message}`, "error");
  }
}

// ---- wiring -------------------------------------------------------------------------------------

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${ui.input.scrollHeight + 2}px`;
}

ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
ui.input.addEventListener("input", autosize);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.controller && !ui.keyDialog.open) { e.preventDefault(); stop(); }
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.model.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, ui.model.value));
ui.attach.addEventListener("click", () => ui.file.click());
ui.file.addEventListener("change", async () => { await addFiles([...ui.file.files]); ui.file.value = ""; });

if (navigator.mediaDevices?.getUserMedia && window.AudioWorkletNode) {
  ui.record.addEventListener("click", toggleRecording);
} else {
  ui.record.disabled = true;
  ui.record.title = "Recording needs a secure page (https or localhost) and a browser with AudioWorklet";
}

document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files ?? [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});
document.addEventListener("dragover", (e) => {
  if ([...(e.dataTransfer?.types ?? [])].includes("Files")) {
    e.preventDefault();
    document.body.classList.add("dropping");
  }
});
document.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) document.body.classList.remove("dropping");
});
document.addEventListener("drop", (e) => {
  document.body.classList.remove("dropping");
  const files = [...(e.dataTransfer?.files ?? [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});

loadModels();
ui.input.focus();
