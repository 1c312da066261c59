// The playground: plain JavaScript over the server's public HTTP API (the same routes curl and the
// OpenAI client use), so what works here works for any client. No framework and no build step.
"use strict";

const $ = (id) => document.getElementById(id);

/** An error whose message is fit to show a person as it is (the server's own words where it sent some). */
class ShownError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status; // the HTTP status, when the server answered with one
  }
}

// ---- talking to the server --------------------------------------------------------------------------

const keyInput = $("api-key");
// Kept for the tab's lifetime only: a reload should not make the user type it again, a new session should.
keyInput.value = sessionStorage.getItem("xfusion-api-key") || "";

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** A failed response -> ShownError. The server answers {"error": {"message": ...}}; anything in between
 * (a proxy, a crash) may not, and then the status line is the best there is. */
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText || "error"}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${body.error.message} (HTTP ${response.status})`;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ShownError(message, response.status);
}

async function api(method, path, body) {
  const isForm = body instanceof FormData; // multipart: the browser writes its own Content-Type boundary
  const init = { method, headers: authHeaders(isForm || !body ? {} : { "Content-Type": "application/json" }) };
  if (body) init.body = isForm ? body : JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ShownError(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** Server-sent events from a POST's response body. EventSource cannot be used: it only sends GET requests
 * and cannot carry the Authorization header. Yields each JSON payload; an error event is thrown. */
async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ShownError(event.error.message || "The server reported an error.");
      yield event;
    }
  }
  // Every stream of this server ends with [DONE]; without it the answer shown may be cut short.
  throw new ShownError("The stream ended before the server finished (connection closed).");
}

/** One panel's run: busy state, status line, and the error shown in its role="alert" element. */
async function runIn(panelId, task) {
  const panel = $(panelId);
  if (panel.dataset.state === "running") return;
  const error = panel.querySelector(".error");
  const status = panel.querySelector(".status");
  // aria-disabled, not disabled: a disabled button would drop the keyboard focus that pressed it.
  const buttons = panel.querySelectorAll("button");
  panel.dataset.state = "running";
  panel.setAttribute("aria-busy", "true");
  error.hidden = true;
  error.textContent = "";
  buttons.forEach((b) => b.setAttribute("aria-disabled", "true"));
  try {
    await task((text) => { status.textContent = text; });
    panel.dataset.state = "done";
  } catch (err) {
    error.textContent = err instanceof ShownError ? err.message : `Something went wrong: ${err.message}`;
    error.hidden = false;
    status.textContent = "";
    panel.dataset.state = "error";
  } finally {
    panel.removeAttribute("aria-busy");
    buttons.forEach((b) => b.removeAttribute("aria-disabled"));
  }
}

const finished = (reason) => (reason === "length" ? "Done (stopped at the token limit)." : "Done.");

// How the served checkpoint answers with an image: text_first, it says what it draws before drawing it.
let imageAnswer = { text_first: false };

/** The served model's name, or why it could not be had (a missing key is the common case). */
async function checkServer() {
  const info = $("model-info");
  const alert = $("server-error");
  try {
    const models = await (await api("GET", "/v1/models")).json();
    info.textContent = `Model: ${models.data.map((m) => m.id).join(", ")}`;
    imageAnswer = models.data[0].image_answer || imageAnswer;
    alert.hidden = true;
  } catch (err) {
    info.textContent = err.status === 401 ? "This server needs an API key: enter it above." : "Not connected.";
    alert.textContent = err.message;
    alert.hidden = false;
  }
}

keyInput.addEventListener("change", () => {
  sessionStorage.setItem("xfusion-api-key", keyInput.value.trim());
  checkServer();
});

// ---- text to image ------------------------------------------------------------------------------------

/** A number field's value, or undefined when empty (the server then uses its default). */
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function imageCard(grid, index) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  const caption = document.createElement("figcaption");
  img.alt = `Image ${index + 1}: waiting for the first step`;
  figure.append(img, caption);
  grid.append(figure);
  return { img, caption };
}

function showImage(card, b64, kind, label, alt) {
  card.img.src = `data:image/png;base64,${b64}`;
  card.img.className = kind; // "preview" while denoising, "final" once done
  card.img.alt = alt;
  card.caption.textContent = label;
}

$("gen-form").addEventListener("submit", (event) => {
  event.preventDefault();
  runIn("generate", async (say) => {
    const prompt = $("gen-prompt").value.trim();
    const steps = numberField("gen-steps");
    const n = numberField("gen-n") ?? 1;
    // Each preview costs a VAE decode: about eight per image is enough to watch it form.
    const body = { prompt, n, stream: true, preview_every: steps ? Math.max(1, Math.round(steps / 8)) : 4 };
    if (steps !== undefined) body.steps = steps;
    if (numberField("gen-guidance") !== undefined) body.guidance_scale = numberField("gen-guidance");
    if (numberField("gen-seed") !== undefined) body.seed = numberField("gen-seed");

    const progress = $("gen-progress");
    progress.removeAttribute("value"); // indeterminate while queued and while the prompt is prefilled
    const grid = $("gen-images");
    grid.replaceChildren();
    say("Waiting for the server…");
    try {
      await streamImages(await api("POST", "/v1/generate-image", body), prompt, n, say);
    } catch (err) {
      progress.value = 0; // not left spinning (or half full) beside the error
      throw err;
    }
  });
});

/** Step events move the progress bar and show previews (the current x0 guess); `completed` the images. */
async function streamImages(response, prompt, n, say) {
  const progress = $("gen-progress");
  const cards = Array.from({ length: n }, (_, i) => imageCard($("gen-images"), i));
  for await (const ev of sse(response)) {
    if (ev.type === "step") {
      progress.max = ev.steps;
      progress.value = ev.step;
      say(`Step ${ev.step} of ${ev.steps}`);
      (ev.images || []).forEach((b64, i) => showImage(cards[i], b64, "preview", `Preview at step ${ev.step}`,
        `Image ${i + 1}, preview at step ${ev.step} of ${ev.steps}`));
    } else if (ev.type === "completed") {
      progress.value = progress.max;
      ev.data.forEach((item, i) => {
        showImage(cards[i], item.b64_json, "final", `Seed ${item.seed}`,
          `Image ${i + 1} for "${prompt}" (seed ${item.seed})`);
        const link = document.createElement("a");
        link.href = cards[i].img.src;
        link.download = `xfusion-seed-${item.seed}.png`;
        link.textContent = "Download";
        cards[i].caption.append(" · ", link);
      });
      say(`Done: ${ev.data.length} image${ev.data.length === 1 ? "" : "s"}.`);
    }
  }
}

// ---- image to caption ---------------------------------------------------------------------------------

const dropZone = $("drop-zone");
const fileInput = $("cap-file");

function captionFile(file) {
  runIn("caption", async (say) => {
    const img = $("cap-image");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(file);
    img.alt = `The image being captioned: ${file.name}`;
    const text = $("cap-text");
    text.textContent = "";
    $("cap-result").hidden = false;
    // Multipart: the file goes up as it is, and the server (not the page) judges whether it is an image.
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("stream", "true");
    const instruction = $("cap-prompt").value.trim();
    if (instruction) form.append("prompt", instruction);
    say(`Captioning ${file.name}…`);
    const response = await api("POST", "/v1/caption", form);
    for await (const ev of sse(response)) {
      text.textContent += ev.delta || "";
      if (ev.finish_reason) say(finished(ev.finish_reason));
    }
  });
}

dropZone.addEventListener("click", () => fileInput.click());
dropZone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault(); // Space would scroll the page
    fileInput.click();
  }
});
fileInput.addEventListener("change", () => {
  if (fileInput.files.length) captionFile(fileInput.files[0]);
  fileInput.value = ""; // choosing the same file again must fire `change` again
});
["dragenter", "dragover"].forEach((type) => dropZone.addEventListener(type, (event) => {
  event.preventDefault(); // without this the browser opens the dropped file itself
  dropZone.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => dropZone.addEventListener(type, () => dropZone.classList.remove("over")));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) captionFile(file);
});

checkServer();
