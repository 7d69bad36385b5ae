// The chat page of `lmforge serve`: streamed chat completions from this server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), system: $("system"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"), message: $("message"), send: $("send"),
  stop: $("stop"), newChat: $("new-chat"), transcript: $("transcript"), status: $("status"),
  composer: $("composer"), settings: $("settings"),
};
const KEY_STORE = "lmforge.apiKey";

let history = []; // the finished user and assistant turns of this conversation
let running = null; // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The message of an OpenAI error object ({"error": {"message": ...}}) or of a bare {"error": "..."}.
function errorMessage(body, status) {
  const error = body && body.error;
  const text = (error && (error.message || (typeof error === "string" ? error : JSON.stringify(error))))
    || `the server answered HTTP ${status}`;
  return status === 401 ? `The server needs an API key: enter it in the "API key" field. (${text})` : text;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return new Error(errorMessage(body, response.status));
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await failure(response);
    const models = (await response.json()).data || [];
    const chosen = ui.model.value;
    ui.model.replaceChildren(...models.map((m) => {
      const label = m.parent ? `${m.id} (adapter of ${m.parent})` : m.id;
      return new Option(label, m.id, false, m.id === chosen);
    }));
    ui.status.textContent = "";
  } catch (e) {
    ui.status.textContent = `Models: ${e.message}`;
  }
}

function addTurn(role, text) {
  const el = document.createElement("div");
  el.className = role;
  el.textContent = text;
  ui.transcript.append(el);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return el;
}

function busy(on) {
  ui.send.disabled = on;
  ui.stop.disabled = !on;
}

// Server-sent events: the content deltas of `data: {...}` lines until `data: [DONE]`; an error event throws.
async function readStream(response, onDelta) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return;
      }
      const event = JSON.parse(data);
      if (event.error) throw new Error(errorMessage(event, 200));
      const piece = event.choices && event.choices[0] && event.choices[0].delta
        && event.choices[0].delta.content;
      if (piece) onDelta(piece);
    }
  }
}

async function send() {
  const text = ui.message.value.trim();
  if (!text || running) return;
  ui.message.value = "";
  running = new AbortController();
  busy(true);
  const turns = history; // "New chat" during the reply starts another list: this one is left behind
  addTurn("user", text);
  turns.push({ role: "user", content: text });
  const reply = addTurn("assistant", "");
  reply.dataset.state = "streaming";
  let content = "";
  try {
    if (!ui.model.value) await loadModels();
    const system = ui.system.value.trim();
    const body = {
      model: ui.model.value,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...turns],
      stream: true,
      temperature: Number(ui.temperature.value),
      top_p: Number(ui.topP.value),
    };
    if (ui.maxTokens.value) body.max_tokens = parseInt(ui.maxTokens.value, 10);
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw await failure(response);
    await readStream(response, (piece) => {
      content += piece;
      reply.textContent = content;
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
    });
    turns.push({ role: "assistant", content });
    reply.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") { // Stop: keep what came, as the assistant's turn
      turns.push({ role: "assistant", content });
      reply.dataset.state = "stopped";
    } else { // the failed question leaves the conversation (it stays on screen)
      turns.pop();
      const note = document.createElement("span");
      note.className = "error";
      note.setAttribute("role", "alert");
      note.textContent = e.message;
      reply.append(note);
      reply.dataset.state = "error";
    }
  } finally {
    running = null;
    busy(false);
    ui.message.focus();
  }
}

function newChat() {
  if (running) running.abort();
  history = [];
  ui.transcript.replaceChildren();
  ui.message.focus();
}

function showValue(input) {
  const output = $(`${input.id}-value`);
  const update = () => { output.textContent = input.value; };
  input.addEventListener("input", update);
  update();
}

let keyTimer = null;
ui.apiKey.value = localStorage.getItem(KEY_STORE) || "";
ui.apiKey.addEventListener("input", () => {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadModels, 300);
});
ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => { if (running) running.abort(); });
ui.newChat.addEventListener("click", newChat);
showValue(ui.temperature);
showValue(ui.topP);
if (window.matchMedia("(max-width: 700px)").matches) ui.settings.open = false;
loadModels();
