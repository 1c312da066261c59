// The conversation panel (loaded after app.js, whose helpers it uses): messages with pictures attached, the
// whole conversation sent with each turn to /v1/chat (OpenAI's message shape, images as image_url data URIs),
// answers as text, as an image (modalities: ["image"]) or as an edit of the attached picture
// (/v1/images/edits); a checkpoint that says what it draws first sends that text before its image, and the page
// shows it. The API is stateless: the page keeps the history, the model's words and images included.
"use strict";

const history = []; // OpenAI messages so far; an assistant's images ride in `images`, as the API returns them
const chatInput = $("chat-input");
const attachInput = $("chat-file");
let attached = []; // data URIs of the pictures waiting to go with the next message

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ShownError(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

function showAttached() {
  const strip = $("chat-attached");
  strip.replaceChildren(...attached.map((src, i) => {
    const img = document.createElement("img");
    img.src = src;
    img.alt = `Attached picture ${i + 1}`;
    return img;
  }));
  strip.hidden = attached.length === 0;
  $("chat-attach-clear").hidden = attached.length === 0;
}

attachInput.addEventListener("change", async () => {
  const files = Array.from(attachInput.files).filter((f) => f.type.startsWith("image/"));
  attached = attached.concat(await Promise.all(files.map(readAsDataURL)));
  attachInput.value = "";
  showAttached();
});
$("chat-attach").addEventListener("click", () => attachInput.click());
$("chat-attach-clear").addEventListener("click", () => { attached = []; showAttached(); });

function chatMessage(role, content, images = []) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  const pictures = document.createElement("div");
  pictures.className = "images";
  item.append(who, text, pictures);
  $("chat-log").append(item);
  const shown = { item, text, pictures, show(srcs) {
    pictures.replaceChildren(...srcs.map((src, i) => {
      const img = document.createElement("img");
      img.src = src;
      img.className = "final";
      img.alt = `${role === "user" ? "Your" : "The model's"} picture ${i + 1}`;
      return img;
    }));
  } };
  shown.show(images);
  item.scrollIntoView({ block: "nearest" });
  return shown;
}

/** An OpenAI user message: plain text, or parts when pictures go with it: the pictures, then the text, as
 * /v1/images/edits and the demo's training put them. */
function userMessage(content, pictures) {
  if (!pictures.length) return { role: "user", content };
  return { role: "user", content: [...pictures.map((url) => ({ type: "image_url", image_url: { url } })),
    { type: "text", text: content }] };
}

const dataURL = (b64) => `data:image/png;base64,${b64}`;

async function answerText(messages, answer, say) {
  let text = "";
  const response = await api("POST", "/v1/chat", { messages, stream: true });
  for await (const ev of sse(response)) {
    const choice = ev.choices && ev.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      text += choice.delta.content;
      answer.text.textContent = text;
    }
    if (choice && choice.finish_reason) say(finished(choice.finish_reason));
  }
  return { role: "assistant", content: text };
}

async function answerImage(messages, answer, say) {
  const body = { messages, stream: true, modalities: ["image"] };
  const seed = numberField("chat-seed");
  if (seed !== undefined) body.seed = seed;
  let images = [];
  let text = ""; // what a checkpoint that says what it draws writes first
  for await (const ev of sse(await api("POST", "/v1/chat", body))) {
    if (ev.progress) say(`Drawing: step ${ev.progress.step} of ${ev.progress.steps}`);
    const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
    if (delta && delta.content) {
      text += delta.content;
      answer.text.textContent = text;
    }
    if (delta && delta.images) images = delta.images;
  }
  answer.show(images.map((im) => im.image_url.url));
  say("Done.");
  return { role: "assistant", content: text, images };
}

async function answerEdit(content, pictures, answer, say) {
  if (!pictures.length) throw new ShownError("Attach the picture to edit first.");
  const form = new FormData();
  for (const [i, url] of pictures.entries()) form.append("image[]", await (await fetch(url)).blob(), `picture-${i}.png`);
  form.append("prompt", content);
  const seed = numberField("chat-seed");
  if (seed !== undefined) form.append("seed", String(seed));
  say("Editing the picture…");
  const result = await (await api("POST", "/v1/images/edits", form)).json();
  const images = result.data.map((d) => ({ type: "image_url", image_url: { url: dataURL(d.b64_json) } }));
  // revised_prompt: what a checkpoint that says what it draws wrote before its image (elsewhere the prompt)
  const said = imageAnswer.text_first ? result.data[0].revised_prompt : "";
  answer.text.textContent = said;
  answer.show(images.map((im) => im.image_url.url));
  say("Done.");
  return { role: "assistant", content: said, images };
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = chatInput.value.trim();
  const pictures = attached;
  const mode = $("chat-mode").value; // "text", "image" or "edit"
  if (!content && !pictures.length) return;
  runIn("chat", async (say) => {
    const asked = userMessage(content, pictures);
    const messages = [...history, asked];
    const shownAsked = chatMessage("user", content, pictures);
    const answer = chatMessage("assistant", "");
    chatInput.value = "";
    attached = [];
    showAttached();
    say(mode === "text" ? "The model is answering…" : "Waiting for the server…");
    let reply;
    try {
      if (mode === "edit") reply = await answerEdit(content, pictures, answer, say);
      else if (mode === "image") reply = await answerImage(messages, answer, say);
      else reply = await answerText(messages, answer, say);
    } catch (err) {
      // A failed turn is not part of the conversation: take it back and give the user their message again.
      shownAsked.item.remove();
      answer.item.remove();
      chatInput.value = content;
      attached = pictures;
      showAttached();
      throw err;
    }
    history.push(asked, reply);
  });
});

chatInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("chat-clear").addEventListener("click", () => {
  if ($("chat").dataset.state === "running") return; // the answer being written would land in the new one
  history.length = 0;
  attached = [];
  showAttached();
  $("chat-log").replaceChildren();
  $("chat-status").textContent = "";
  chatInput.focus();
});
