// Drives the chat page in Debian's headless chromium (playwright-core) and prints one JSON object with
// what the page showed; tests/ui_browser.rs starts the servers, runs this, and checks the results
// against the goldens.
//
//   node tests/ui/e2e.mjs BASE_URL SPEC_JSON
//
// SPEC_JSON: {"key_base": URL of a server started with --api-key, "key": that key,
//             "text": {"prompt"}, "image": {"prompt", "file"}, "audio": {"prompt", "file"},
//             "screenshot": PNG path or null}
// UI_SHOTS_DIR=dir keeps a screenshot of each step.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, specJson] = process.argv.slice(2);
if (!base || !specJson) {
  console.error("usage: node tests/ui/e2e.mjs BASE_URL SPEC_JSON");
  process.exit(2);
}
const spec = JSON.parse(specJson);
const log = (...a) => console.error("[e2e]", ...a);
// UI_SHOTS_DIR=dir: also keep screenshots of the steps, to look at by eye.
const shot = async (page, name) => {
  if (process.env.UI_SHOTS_DIR) await page.screenshot({ path: join(process.env.UI_SHOTS_DIR, `${name}.png`) });
};

const profile = mkdtempSync(join(tmpdir(), "onnx-chat-ui-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
  headless: true,
  // No network here: keep chromium from dialling out (refused connections otherwise flood the log).
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    // A fake microphone (a beep) that needs no permission prompt.
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  ],
  viewport: { width: 1000, height: 760 },
  permissions: ["microphone"],
});
context.setDefaultTimeout(60_000);

const problems = []; // console errors, CSP violations, uncaught exceptions: the page must have none
function watch(page, name) {
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // The browser logs each refused request; on the keyed server the page is meant to meet them.
    if (name === "api-key" && /status of 401/.test(m.text())) return;
    problems.push(`${name}: console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`${name}: exception: ${e.message}`));
  return page;
}

async function openPage(name, url = base) {
  const page = watch(await context.newPage(), name);
  const resp = await page.goto(url);
  const csp = resp.headers()["content-security-policy"] ?? null;
  return { page, csp };
}

async function waitModels(page) {
  await page.waitForFunction(() => document.querySelector("#model")?.value);
  return page.$eval("#model", (s) => [...s.options].map((o) => o.value));
}

async function setAdvanced(page, { temperature, maxTokens }) {
  const open = await page.$eval("#advanced", (d) => d.open);
  if (!open) await page.click("#advanced summary");
  if (temperature !== undefined) await page.fill("#temperature", String(temperature));
  if (maxTokens !== undefined) await page.fill("#max_tokens", String(maxTokens));
}

/** Counts the renders of streamed chunks: text changes and token counts (`data-tokens`) in the log. */
async function countUpdates(page) {
  await page.evaluate(() => {
    window.__updates = 0;
    new MutationObserver((records) => { window.__updates += records.length; }).observe(
      document.querySelector("#log"),
      { subtree: true, childList: true, characterData: true, attributeFilter: ["data-tokens"] },
    );
  });
}

async function lastAnswer(page) {
  const sel = "#log .msg.assistant:last-of-type";
  await page.waitForSelector(`${sel}:not([data-state=streaming])`, { timeout: 120_000 });
  return page.$eval(sel, (m) => ({
    text: m.querySelector(".text").textContent,
    state: m.dataset.state,
    meta: m.querySelector(".meta").textContent,
    tokens: Number(m.dataset.tokens ?? 0),
    updates: window.__updates ?? null,
  }));
}

/** A 16-bit PCM WAV's container tag, rate, length and peak. */
function wavInfo(bytes) {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const rate = v.getUint32(24, true);
  let peak = 0;
  for (let o = 44; o + 1 < bytes.length; o += 2) peak = Math.max(peak, Math.abs(v.getInt16(o, true)));
  const tag = bytes.subarray(0, 4).toString("latin1") + bytes.subarray(8, 12).toString("latin1");
  return { riff: tag, rate, seconds: (bytes.length - 44) / 2 / rate, peak };
}

/** The body the page posted to /v1/chat/completions, with the media payloads summarised. */
function captureRequest(page) {
  return new Promise((resolve) => {
    const on = (req) => {
      if (!req.url().endsWith("/v1/chat/completions")) return;
      page.off("request", on);
      const body = req.postDataJSON();
      for (const m of body.messages) {
        if (!Array.isArray(m.content)) continue;
        for (const p of m.content) {
          if (p.image_url) p.image_url.url = `${p.image_url.url.slice(0, 22)}…(${p.image_url.url.length})`;
          if (p.input_audio) {
            const bytes = Buffer.from(p.input_audio.data, "base64");
            p.input_audio.data = `…(${p.input_audio.data.length})`;
            if (p.input_audio.format === "wav") p.input_audio.wav = wavInfo(bytes);
          }
        }
      }
      resolve(body);
    };
    page.on("request", on);
  });
}

async function getJson(url) {
  const r = await fetch(url);
  return { status: r.status, body: await r.json().catch(() => null) };
}

async function metric(name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : null;
}

const out = { problems };
try {
  // (a) Text, greedy via the Advanced controls, sent with Enter; Shift+Enter makes a new line.
  {
    const { page, csp } = await openPage("text");
    out.csp = csp;
    out.models = await waitModels(page);
    await setAdvanced(page, { temperature: 0, maxTokens: 32 });
    await page.focus("#input");
    await page.keyboard.type("line one");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("line two");
    out.shift_enter_value = await page.inputValue("#input");
    await page.fill("#input", spec.text.prompt);
    await countUpdates(page);
    const request = captureRequest(page);
    await page.keyboard.press("Enter");
    out.text = await lastAnswer(page);
    out.text.request = await request;
    out.text.input_after = await page.inputValue("#input");
    // The conversation goes on: the next request carries the first exchange.
    await setAdvanced(page, { maxTokens: 4 });
    const second = captureRequest(page);
    await page.fill("#input", "And another one?");
    await page.keyboard.press("Enter");
    out.text.second_request = (await second).messages;
    out.text.second = await lastAnswer(page);
    // Phone width: nothing wider than the screen.
    await page.setViewportSize({ width: 360, height: 740 });
    out.phone_overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    await page.click("#advanced summary");
    await shot(page, "phone");
    await page.close();
  }

  // (b) An image from the file picker, then its answer; drop and paste attach too.
  {
    const { page } = await openPage("image");
    await waitModels(page);
    await setAdvanced(page, { temperature: 0, maxTokens: 32 });
    await page.setInputFiles("#file", spec.image.file);
    await page.waitForSelector("#attachments img");
    await page.fill("#input", spec.image.prompt);
    const request = captureRequest(page);
    await page.click("#send");
    out.image = await lastAnswer(page);
    out.image.request = await request;
    out.image.user_images = await page.$$eval("#log .msg.user img", (imgs) => imgs.map((i) => i.naturalWidth));
    out.image.attachments_after = await page.$$eval("#attachments li", (l) => l.length);
    if (spec.screenshot) {
      await page.click("#advanced summary"); // closed, for a tidy picture
      await page.screenshot({ path: spec.screenshot });
      log("screenshot written to", spec.screenshot);
    }
    // Paste and drop: each adds a thumbnail; the remove buttons take them away.
    out.paste_drop = await page.evaluate(async (b64) => {
      const png = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = () => { const d = new DataTransfer(); d.items.add(new File([png], "x.png", { type: "image/png" })); return d; };
      const count = () => document.querySelectorAll("#attachments li img").length;
      const settle = () => new Promise((r) => setTimeout(r, 200));
      document.querySelector("#input").dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt(), bubbles: true, cancelable: true }));
      await settle();
      const afterPaste = count();
      document.querySelector("#log").dispatchEvent(new DragEvent("drop", { dataTransfer: dt(), bubbles: true, cancelable: true }));
      await settle();
      const afterDrop = count();
      while (document.querySelector("#attachments .remove")) document.querySelector("#attachments .remove").click();
      return { afterPaste, afterDrop, afterRemove: count() };
    }, readFileSync(spec.image.file).toString("base64"));
    await page.close();
  }

  // Audio from the file picker, then its answer.
  {
    const { page } = await openPage("audio");
    await waitModels(page);
    await setAdvanced(page, { temperature: 0, maxTokens: 32 });
    await page.setInputFiles("#file", spec.audio.file);
    await page.waitForSelector("#attachments audio");
    await page.fill("#input", spec.audio.prompt);
    const request = captureRequest(page);
    await page.click("#send");
    out.audio = await lastAnswer(page);
    out.audio.request = await request;
    out.audio.user_players = await page.$$eval("#log .msg.user audio", (a) => a.length);

    // The microphone (chromium's fake one): recorded to WAV in the page, and the server accepts it.
    await page.click("#record");
    await page.waitForFunction(() => document.querySelector("#record").getAttribute("aria-pressed") === "true");
    await page.waitForTimeout(1500);
    await page.click("#record");
    await page.waitForSelector("#attachments audio");
    out.record = { attached: await page.$$eval("#attachments audio", (a) => a.map((x) => x.title)) };
    await setAdvanced(page, { maxTokens: 4 });
    await page.fill("#input", "What is this sound?");
    const recRequest = captureRequest(page);
    await page.click("#send");
    out.record.answer = await lastAnswer(page);
    await shot(page, "audio");
    out.record.sent = (await recRequest).messages.at(-1).content[0].input_audio;
    await page.close();
  }

  // (c) Stop mid-stream: the answer streams in, the page aborts the fetch, and the server cancels the
  // job and frees the worker slot (a greedy text_basic runs to its 3000 tokens otherwise, for seconds).
  {
    const { page } = await openPage("stop");
    await waitModels(page);
    const ready0 = (await getJson(`${base}/ready`)).body;
    const completion0 = await metric("onnxchat_completion_tokens_total");
    await setAdvanced(page, { temperature: 0, maxTokens: 3000 });
    await page.fill("#input", spec.text.prompt);
    await countUpdates(page);
    await page.click("#send");
    await page.waitForFunction(() => window.__updates >= 3
      && document.querySelector("#log .msg.assistant:last-of-type .text").textContent.length > 0);
    let during = null;
    for (let i = 0; i < 100; i++) { // the worker announces a taken slot at once, or at its next heartbeat
      during = (await getJson(`${base}/ready`)).body;
      if (during.free_slots < ready0.free_slots) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const inFlightDuring = await metric("onnxchat_requests_in_flight");
    const streamingAtStop = await page.$eval("#log .msg.assistant:last-of-type", (m) => m.dataset.state);
    const t0 = Date.now();
    await page.click("#stop");
    const answer = await lastAnswer(page);
    let after = null;
    await shot(page, "stopped");
    let inFlight = null;
    for (let i = 0; i < 200; i++) {
      after = (await getJson(`${base}/ready`)).body;
      inFlight = await metric("onnxchat_requests_in_flight");
      if (after.free_slots === ready0.free_slots && inFlight === 0) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    out.stop = {
      answer, state_at_stop: streamingAtStop,
      free_before: ready0.free_slots, free_during: during.free_slots, free_after: after.free_slots,
      in_flight_during: inFlightDuring, in_flight_after: inFlight, freed_ms: Date.now() - t0,
      completion_tokens_added: (await metric("onnxchat_completion_tokens_total")) - completion0,
      send_visible: await page.isVisible("#send"), focused: await page.evaluate(() => document.activeElement.id),
    };
    await page.close();
  }

  // (d) A server with --api-key: the page asks for the key (a wrong one is refused with the API's
  // words), keeps it in session storage, and then works.
  {
    const { page } = await openPage("api-key", spec.key_base);
    await page.waitForSelector("#key-dialog[open]");
    const reason = await page.textContent("#key-reason");
    await page.fill("#key", "wrong-key");
    await page.press("#key", "Enter");
    await page.waitForFunction(() => document.querySelector("#key-dialog").open && !document.querySelector("#key").value);
    const reason2 = await page.textContent("#key-reason");
    await shot(page, "api-key");
    await page.fill("#key", spec.key);
    await page.click("#key-ok");
    const models = await waitModels(page);
    await setAdvanced(page, { temperature: 0, maxTokens: 32 });
    await page.fill("#input", spec.text.prompt);
    await page.click("#send");
    const answer = await lastAnswer(page);
    out.api_key = {
      reason, reason2, models, answer,
      stored: await page.evaluate(() => sessionStorage.getItem("onnx-chat.api-key")),
      dialog_open_after: await page.$eval("#key-dialog", (d) => d.open),
    };
    // Cancelling the dialog leaves the API's message on the page.
    await page.evaluate(() => sessionStorage.clear());
    await page.click("#new-chat");
    await page.fill("#input", "hello");
    await page.click("#send");
    await page.waitForSelector("#key-dialog[open]");
    await page.click("#key-cancel");
    out.api_key.cancelled = await lastAnswer(page);
    await shot(page, "api-key-cancelled");
    await page.close();
  }
} catch (e) {
  out.error = String(e?.stack ?? e);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(out));
