// The chat page of lmtune serve: plain JavaScript over the server's own OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation so far: {role, content}
let controller = null;  // aborts the answer being streamed

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    setStatus("Cannot list the models: " + await errorText(response));
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...(await response.json()).data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.parent ? `${m.id} (adapter on ${m.parent})` : m.id;
    return option;
  }));
  // Keep the user's choice; at first, the first adapter (what was fine-tuned), else the base.
  if (chosen) select.value = chosen;
  else if (select.options.length > 1) select.selectedIndex = 1;
  setStatus("");
}

// Server-sent events: "data: ..." lines, events separated by blank lines (\n or \r\n).
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) yield line.slice(5).replace(/^ /, "");
    }
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant streaming", "");
  const system = $("system").value.trim();
  const body = {
    model: $("model").value || undefined,
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
  };
  controller = new AbortController();
  busy(true);
  setStatus("answering…");
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    history.push({ role: "assistant", content: answer });
    setStatus(finish === "length" ? "(the answer reached max tokens)" : "");
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      setStatus("(stopped)");
    } else {
      history.pop();  // the message was not answered: it is not part of the conversation
      bubble.remove();
      addMessage("error", String(err.message || err));
      setStatus("");
    }
  } finally {
    bubble.classList.remove("streaming");
    busy(false);
    controller = null;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
  setStatus("new conversation");
});
$("api-key").addEventListener("change", loadModels);
loadModels();
