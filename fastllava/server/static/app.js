// The fastllava chat page: images (upload, paste, drag and drop, or URL) + questions -> POST /v1/chat/completions
// with stream=true; the answer is read as server-sent events and rendered as Markdown while it streams. The whole
// conversation (with its images, as data URLs or the given URLs) is resent each turn, as the OpenAI API expects.
// Stop aborts the fetch, which the server sees as a disconnect and turns into an engine abort.
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var state = {
    model: null,
    maxImages: 8,
    maxImageBytes: 20 * 1024 * 1024,
    history: [],        // OpenAI messages sent so far (user and assistant)
    pending: [],        // images attached to the next question: {url, name}
    controller: null,   // AbortController of the answer being streamed
  };

  function showError(message) {
    var box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  function headers() {
    var h = { "Content-Type": "application/json" };
    if (apiKey()) { h["Authorization"] = "Bearer " + apiKey(); }
    return h;
  }

  // ------------------------------------------------------------------------------------------ attachments

  function renderAttachments() {
    var box = $("attachments");
    box.textContent = "";
    state.pending.forEach(function (item, index) {
      var chip = document.createElement("div");
      chip.className = "attachment";
      var img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      var remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.title = "Remove " + item.name;
      remove.addEventListener("click", function () {
        state.pending.splice(index, 1);
        renderAttachments();
      });
      chip.appendChild(img);
      chip.appendChild(remove);
      box.appendChild(chip);
    });
  }

  function countImages() {
    var n = state.pending.length;
    state.history.forEach(function (m) {
      if (Array.isArray(m.content)) {
        m.content.forEach(function (p) { if (p.type === "image_url") { n++; } });
      }
    });
    return n;
  }

  function attachFile(file) {
    if (!file || !/^image\//.test(file.type)) {
      showError("Only image files can be attached" + (file ? " (" + file.name + " is " + (file.type || "unknown") + ")" : ""));
      return;
    }
    if (file.size > state.maxImageBytes) {
      showError(file.name + " is " + Math.round(file.size / 1048576) + " MB; the server accepts at most " +
        Math.round(state.maxImageBytes / 1048576) + " MB per image");
      return;
    }
    if (countImages() >= state.maxImages) {
      showError("The server accepts at most " + state.maxImages + " images per conversation");
      return;
    }
    var reader = new FileReader();
    reader.onload = function () {
      state.pending.push({ url: reader.result, name: file.name || "pasted image" });
      renderAttachments();
      showError("");
    };
    reader.onerror = function () { showError("Could not read " + file.name); };
    reader.readAsDataURL(file);
  }

  function attachUrl() {
    var url = $("image-url").value.trim();
    if (!url) { return; }
    if (!/^(https?:|data:image\/)/i.test(url)) {
      showError("Image URLs must start with http://, https:// or data:image/");
      return;
    }
    if (countImages() >= state.maxImages) {
      showError("The server accepts at most " + state.maxImages + " images per conversation");
      return;
    }
    state.pending.push({ url: url, name: url });
    $("image-url").value = "";
    renderAttachments();
    showError("");
  }

  // ------------------------------------------------------------------------------------------ messages

  function addBubble(role) {
    $("empty-hint").hidden = true;
    var bubble = document.createElement("div");
    bubble.className = "msg " + role;
    $("messages").appendChild(bubble);
    return bubble;
  }

  function showUserMessage(text, images) {
    var bubble = addBubble("user");
    images.forEach(function (item) {
      var img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      img.className = "msg-image";
      bubble.appendChild(img);
    });
    if (text) {
      var p = document.createElement("p");
      p.textContent = text;
      bubble.appendChild(p);
    }
    scrollDown();
  }

  function scrollDown() {
    var box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("prompt").disabled = busy;
  }

  function errorMessage(body, status) {
    if (body && body.error && body.error.message) {
      return "Error " + (status ? status + ": " : "") + body.error.message;
    }
    return "Error " + status;
  }

  // Reads an SSE stream of chat.completion.chunk events; calls onDelta(text) for each piece of content.
  async function readStream(response, onDelta) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var finish = null;
    for (;;) {
      var part = await reader.read();
      if (part.done) { break; }
      buffer += decoder.decode(part.value, { stream: true });
      var events = buffer.split("\n\n");
      buffer = events.pop();
      for (var i = 0; i < events.length; i++) {
        var data = events[i].split("\n").filter(function (l) { return l.indexOf("data:") === 0; })
          .map(function (l) { return l.slice(5).trim(); }).join("\n");
        if (!data) { continue; }
        if (data === "[DONE]") { return finish; }
        var chunk = JSON.parse(data);
        if (chunk.error) { throw new Error(errorMessage(chunk)); }
        (chunk.choices || []).forEach(function (choice) {
          if (choice.delta && choice.delta.content) { onDelta(choice.delta.content); }
          if (choice.finish_reason) { finish = choice.finish_reason; }
        });
      }
    }
    return finish;
  }

  async function send(event) {
    if (event) { event.preventDefault(); }
    if (state.controller) { return; }
    var text = $("prompt").value.trim();
    if (!text && !state.pending.length) { return; }
    showError("");
    var images = state.pending.slice();
    var content = images.map(function (item) { return { type: "image_url", image_url: { url: item.url } }; });
    if (text) { content.push({ type: "text", text: text }); }
    var userMessage = { role: "user", content: content };
    showUserMessage(text, images);
    state.pending = [];
    renderAttachments();
    $("prompt").value = "";

    var messages = [];
    var system = $("system-prompt").value.trim();
    if (system) { messages.push({ role: "system", content: system }); }
    messages = messages.concat(state.history, [userMessage]);
    var body = {
      model: state.model || undefined,
      messages: messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
    };
    // Empty = let the server decide (up to the end of the model's context).
    if ($("max-tokens").value) { body.max_tokens = Number($("max-tokens").value); }

    var bubble = addBubble("assistant");
    bubble.classList.add("streaming");
    var answer = "";
    var stopped = false;
    state.controller = new AbortController();
    setBusy(true);
    try {
      var response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
      });
      if (!response.ok) {
        var errorBody = null;
        try { errorBody = await response.json(); } catch (e) { /* not JSON */ }
        throw new Error(errorMessage(errorBody, response.status));
      }
      var finish = await readStream(response, function (delta) {
        answer += delta;
        bubble.innerHTML = window.renderMarkdown(answer);
        scrollDown();
      });
      if (finish === "length") { bubble.insertAdjacentHTML("beforeend", '<p class="muted">(stopped at the token limit)</p>'); }
    } catch (error) {
      if (error.name === "AbortError") {
        stopped = true;
        bubble.insertAdjacentHTML("beforeend", '<p class="muted">(stopped)</p>');
      } else {
        showError(error.message || String(error));
        if (!answer) { bubble.remove(); }
      }
    } finally {
      bubble.classList.remove("streaming");
      state.controller = null;
      setBusy(false);
      $("prompt").focus();
    }
    if (answer || stopped) {
      state.history.push(userMessage, { role: "assistant", content: answer });
    } else {
      // Nothing came back: the question and its images go back into the composer for another try.
      state.pending = images;
      renderAttachments();
      if (!$("prompt").value) { $("prompt").value = text; }
      var bubbles = $("messages").querySelectorAll(".msg.user");
      if (bubbles.length) { bubbles[bubbles.length - 1].remove(); }
    }
  }

  function stop() {
    if (state.controller) { state.controller.abort(); }
  }

  function newChat() {
    stop();
    state.history = [];
    state.pending = [];
    renderAttachments();
    $("messages").querySelectorAll(".msg").forEach(function (m) { m.remove(); });
    $("empty-hint").hidden = false;
    showError("");
  }

  // ------------------------------------------------------------------------------------------ wiring

  function wire() {
    $("composer").addEventListener("submit", send);
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("add-url").addEventListener("click", attachUrl);
    $("image-url").addEventListener("keydown", function (e) {
      if (e.key === "Enter") { e.preventDefault(); attachUrl(); }
    });
    $("prompt").addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { send(e); }
    });
    $("file-input").addEventListener("change", function (e) {
      Array.prototype.forEach.call(e.target.files, attachFile);
      e.target.value = "";
    });
    $("toggle-settings").addEventListener("click", function () {
      var panel = $("settings");
      panel.hidden = !panel.hidden;
      $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("api-key").addEventListener("change", function () {
      try { sessionStorage.setItem("fastllava-api-key", apiKey()); } catch (e) { /* storage disabled */ }
    });
    document.addEventListener("paste", function (e) {
      var items = (e.clipboardData && e.clipboardData.items) || [];
      Array.prototype.forEach.call(items, function (item) {
        if (item.kind === "file" && /^image\//.test(item.type)) { attachFile(item.getAsFile()); e.preventDefault(); }
      });
    });
    var depth = 0;
    document.addEventListener("dragenter", function (e) { e.preventDefault(); depth++; $("drop-overlay").hidden = false; });
    document.addEventListener("dragleave", function () { depth = Math.max(0, depth - 1); if (!depth) { $("drop-overlay").hidden = true; } });
    document.addEventListener("dragover", function (e) { e.preventDefault(); });
    document.addEventListener("drop", function (e) {
      e.preventDefault();
      depth = 0;
      $("drop-overlay").hidden = true;
      Array.prototype.forEach.call((e.dataTransfer && e.dataTransfer.files) || [], attachFile);
    });
  }

  async function loadConfig() {
    try { $("api-key").value = sessionStorage.getItem("fastllava-api-key") || ""; } catch (e) { /* storage disabled */ }
    try {
      var config = await (await fetch("/page-config.json")).json();
      state.model = config.model;
      state.maxImages = config.max_images;
      state.maxImageBytes = config.max_image_bytes;
      $("model-name").textContent = config.model;
      if (config.needs_api_key && !apiKey()) {
        $("settings").hidden = false;
        $("toggle-settings").setAttribute("aria-expanded", "true");
      }
    } catch (error) {
      showError("Cannot reach the server: " + error.message);
    }
  }

  wire();
  loadConfig();
  document.body.dataset.ready = "true";
})();
