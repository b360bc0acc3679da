// The chat page: a conversation streamed from this server's POST /v1/chat/completions.
//
// The conversation lives in this page only (`conversation`, the OpenAI messages); each answer
// sends all of it. Streaming reads the server-sent events from fetch's body (EventSource cannot
// POST); Stop aborts that fetch, and the server stops the generation when the stream closes.
// With --api-key the key is asked for once and kept in sessionStorage (this tab only).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "cake-api-key";
  const STATUS_EVERY_MS = 10000;
  const keyRequired =
    document.querySelector('meta[name="cake-api-key-required"]').content === "true";

  let conversation = []; // [{role, content}], user and assistant turns (no system message)
  let controller = null; // the AbortController of the answer streaming now, if any

  // ------------------------------------------------------------------ the API key

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function askForKey(refused) {
    $("key-error").hidden = !refused;
    $("key-input").value = "";
    if (!$("key-dialog").open) $("key-dialog").showModal();
    $("key-input").focus();
  }

  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    refreshStatus();
    $("input").focus();
  });

  // ------------------------------------------------------------------ the conversation view

  function addMessage(role, text) {
    $("empty-hint").hidden = true;
    const element = document.createElement("div");
    element.className = `message ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    element.appendChild(body);
    $("messages").appendChild(element);
    showText(element, role, text);
    return element;
  }

  function showText(element, role, text) {
    const body = element.querySelector(".body");
    if (role === "assistant") {
      body.innerHTML = window.cakeMarkdown.render(text); // escapes everything first
    } else {
      body.textContent = text;
    }
    scrollToEnd();
  }

  function addNote(element, text, isError) {
    const note = document.createElement("div");
    note.className = isError ? "note error" : "note";
    note.textContent = text;
    element.appendChild(note);
    scrollToEnd();
  }

  function scrollToEnd() {
    const view = $("messages");
    view.scrollTop = view.scrollHeight;
  }

  function setStreaming(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    document.body.classList.toggle("streaming", on);
  }

  // ------------------------------------------------------------------ sending and streaming

  function requestBody() {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const body = { messages: messages.concat(conversation), stream: true };
    body.stream_options = { include_usage: true };
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  // The server-sent events of a response body, one parsed `data:` payload at a time.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) yield data;
      }
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return body.error ? body.error.message : `HTTP ${response.status}`;
    } catch (_) {
      return `HTTP ${response.status}`;
    }
  }

  async function send() {
    const question = $("input").value.trim();
    if (!question || controller) return;
    if (keyRequired && !apiKey()) {
      askForKey(false);
      return;
    }
    $("input").value = "";
    conversation.push({ role: "user", content: question });
    addMessage("user", question);
    const element = addMessage("assistant", "");
    element.classList.add("pending");
    controller = new AbortController();
    setStreaming(true);
    let text = "";
    let usage = null;
    let firstAt = null;
    const started = performance.now();
    let failure = null;
    let drawn = false;
    const draw = () => {
      drawn = false;
      showText(element, "assistant", text);
    };
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!response.ok) {
        failure = await errorMessage(response);
        if (response.status === 401) askForKey(true);
      } else {
        let complete = false; // the server ends every answer with [DONE], or an error event
        for await (const data of events(response)) {
          if (data === "[DONE]") {
            complete = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) {
            failure = chunk.error.message;
            break;
          }
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstAt === null) firstAt = performance.now();
            text += delta.content;
            element.classList.remove("pending");
            if (!drawn) {
              drawn = true;
              requestAnimationFrame(draw);
            }
          }
        }
        // A body that ends with neither (the server went down, a proxy cut it) is not an answer.
        if (!complete && !failure) failure = "the connection closed before the answer was complete";
      }
    } catch (error) {
      if (error.name !== "AbortError") failure = String(error.message || error);
    }
    const stopped = controller.signal.aborted;
    controller = null;
    setStreaming(false);
    element.classList.remove("pending");
    showText(element, "assistant", text);
    element.dataset.done = stopped ? "stopped" : failure ? "error" : "finished";
    if (failure) {
      // The turn leaves the conversation (the next request will not send it) and the
      // question goes back into the box, to send again.
      addNote(element, `error: ${failure}`, true);
      element.classList.add("failed");
      element.previousElementSibling.classList.add("failed");
      conversation.pop();
      if (!$("input").value) $("input").value = question;
    } else {
      // A stopped answer stays in the conversation as far as it got.
      conversation.push({ role: "assistant", content: text });
      if (stopped) addNote(element, "stopped");
      showSpeed(usage, stopped, started, firstAt);
    }
    refreshStatus();
    $("input").focus();
  }

  function showSpeed(usage, stopped, started, firstAt) {
    if (stopped || !usage) {
      $("status-speed").textContent = stopped ? "last answer: stopped" : "";
      return;
    }
    const seconds = (performance.now() - (firstAt === null ? started : firstAt)) / 1000;
    const tokens = usage.completion_tokens;
    // From the first token on: the prompt's prefill is not the answer's speed.
    const rate = tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : 0;
    // The prompt's tokens the server took from its prefix cache (the earlier turns).
    const details = usage.prompt_tokens_details;
    const cached = details && details.cached_tokens ? `, cached ${details.cached_tokens} tokens` : "";
    $("status-speed").textContent =
      `last answer: ${tokens} tokens, ${rate.toFixed(1)} tok/s${cached}`;
  }

  function stop() {
    if (controller) controller.abort();
  }

  function newChat() {
    stop();
    conversation = [];
    for (const element of [...$("messages").querySelectorAll(".message, .note")]) element.remove();
    $("empty-hint").hidden = false;
    $("status-speed").textContent = "";
    $("input").focus();
  }

  // ------------------------------------------------------------------ the status strip

  async function refreshStatus() {
    if (keyRequired && !apiKey()) {
      $("status-model").textContent = "API key needed";
      askForKey(false);
      return;
    }
    let response;
    try {
      response = await fetch("v1/cake/status", { headers: headers() });
    } catch (_) {
      $("status-model").textContent = "server unreachable";
      $("status-stages").textContent = "";
      return;
    }
    if (response.status === 401) {
      $("status-model").textContent = "API key refused";
      askForKey(true);
      return;
    }
    if (!response.ok) {
      $("status-model").textContent = `status: HTTP ${response.status}`;
      return;
    }
    const status = await response.json();
    $("model-name").textContent = status.model;
    $("status-model").textContent = `${status.model} · ${status.context} tokens of context`;
    const stages = $("status-stages");
    stages.textContent = "";
    for (const stage of status.stages) {
      const item = document.createElement("span");
      item.className = `stage ${stage.connected ? "up" : "down"}`;
      const where = stage.worker ? `${stage.worker} (${stage.address})` : "master";
      item.textContent = `blocks ${stage.blocks}: ${where}`;
      item.title = stage.connected ? "reachable" : "not reachable";
      stages.appendChild(item);
    }
  }

  // ------------------------------------------------------------------ wiring

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });

  refreshStatus();
  setInterval(() => {
    // Not while an answer streams, and not to ask again for a key the person dismissed.
    if (!controller && (!keyRequired || apiKey())) refreshStatus();
  }, STATUS_EVERY_MS);
})();
