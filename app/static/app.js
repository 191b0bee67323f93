// saescope's one script of its own (the Content-Security-Policy allows no inline script).

// A "copy" button beside a share link. Buttons with data-copy show only where this script runs.
document.documentElement.classList.add("js");

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const said = (word) => {
    button.textContent = word;
    setTimeout(() => { button.textContent = "copy"; }, 2000);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(button.dataset.copy).then(() => said("copied"), () => selectLink(button, said));
  } else {
    selectLink(button, said); // plain http to another host: no clipboard API
  }
});

// Select the link's text so that Ctrl+C copies it, and copy it where the browser still lets a page.
function selectLink(button, said) {
  const link = document.getElementById(button.getAttribute("aria-controls"));
  if (!link) return said("select and copy");
  window.getSelection().selectAllChildren(link);
  said(document.execCommand && document.execCommand("copy") ? "copied" : "press Ctrl+C");
}

// The probe: the token whose latents the panel lists is outlined as "current" (the server marks it
// when the address names it), and the mark moves with the focus.
document.addEventListener("focusin", (event) => {
  const token = event.target.closest(".probe-tokens .tok");
  if (!token) return;
  document.querySelectorAll(".probe-tokens .tok.current").forEach((old) => old.classList.remove("current"));
  token.classList.add("current");
});

// A token's latents that arrive after the text or the view was drawn again are for a token no
// longer on the page: dropped, with the address and the state they would have set.
document.addEventListener("htmx:beforeSwap", (event) => {
  const source = event.detail.elt;
  if (source.classList.contains("tok") && !document.body.contains(source)) event.detail.shouldSwap = false;
});

// The probe, after a "highlight" (or "clear"): the shaded text stays in view. The result is drawn
// again, and the page used to land far below the text, at the table the button was in.
let showText = false;
document.addEventListener("htmx:beforeRequest", (event) => {
  const source = event.detail.elt;
  showText = source.matches && source.matches("button[name=latent]");
});
document.addEventListener("htmx:afterSettle", (event) => {
  if (!showText || event.detail.elt.id !== "probe-result") return;
  showText = false;
  const text = document.querySelector(".probe-tokens");
  if (!text) return;
  const top = (document.querySelector(".highlight-note") || text).getBoundingClientRect().top;
  if (top < 0 || text.getBoundingClientRect().top > window.innerHeight * 0.6) {
    (document.querySelector(".highlight-note") || text).scrollIntoView({ block: "start" });
  }
  // From the keyboard, the focus goes back to the token whose panel was open (its button is gone).
  const current = text.querySelector(".tok.current");
  if (usingKeyboard && current) current.focus({ preventScroll: true });
});

// The keyboard path through the probe: Tab moves along the tokens (each opens its panel), Enter
// or Space on a token moves the focus into its panel, to its latents' links and buttons.
let usingKeyboard = false;
let panelWanted = null;  // the token whose panel should take the focus once it arrives
document.addEventListener("keydown", (event) => {
  usingKeyboard = true;
  const token = event.target.closest && event.target.closest(".probe-tokens .tok");
  if (!token || (event.key !== "Enter" && event.key !== " ")) return;
  event.preventDefault();
  panelWanted = token.dataset.position;
  focusPanel();
});
document.addEventListener("pointerdown", () => { usingKeyboard = false; }, true);
document.addEventListener("htmx:afterSettle", (event) => { if (event.detail.elt.id === "token-detail") focusPanel(); });
function focusPanel() {
  const panel = document.querySelector(`#token-detail .token-detail[data-position="${panelWanted}"]`);
  if (panelWanted === null || !panel) return;
  panelWanted = null;
  const first = panel.querySelector("a, button");
  if (first) first.focus();
}

// A token clicked (or tapped) on the probe: its panel scrolls into view when it is out of sight.
// Moving along the tokens with Tab leaves the page where the focus is.
let clickedToken = false;
document.addEventListener("pointerdown", (event) => {
  clickedToken = Boolean(event.target.closest(".probe-tokens .tok"));
});
document.addEventListener("keydown", () => { clickedToken = false; });
document.addEventListener("htmx:afterSettle", (event) => {
  if (!clickedToken || event.detail.elt.id !== "token-detail") return;
  const panel = event.detail.elt.closest(".panel") || event.detail.elt;
  const box = panel.getBoundingClientRect();
  if (box.top > window.innerHeight - 80 || box.bottom < 0) panel.scrollIntoView({ block: "nearest" });
});

// The probe's text box: how long the text is, as one types (characters here; tokens come with
// each result, from the server, which counts them as the model does).
function countText() {
  const box = document.getElementById("probe-text");
  const count = document.getElementById("probe-count");
  if (!box || !count) return;
  const tokens = document.querySelector(".probe-summary strong");
  const chars = box.value.length;
  count.textContent = chars ? ` · now ${chars.toLocaleString("en")} characters` +
    (tokens ? `, ${tokens.textContent} tokens` : "") : "";
}
document.addEventListener("input", (event) => { if (event.target.id === "probe-text") countText(); });
document.addEventListener("htmx:afterSettle", countText);
document.addEventListener("DOMContentLoaded", countText);

// A token's value on a phone: a tap shows it (as hovering does with a mouse); another tap, or a
// tap elsewhere, hides it. The probe's tokens open their panel instead.
document.addEventListener("click", (event) => {
  const token = event.target.closest(".context .tok");
  document.querySelectorAll(".context .tok.tip").forEach((shown) => { if (shown !== token) shown.classList.remove("tip"); });
  if (token && token.dataset.tip && !token.closest(".probe-tokens")) token.classList.toggle("tip");
});

// A chart or a table wider than a phone scrolls inside its frame: such a frame takes the focus,
// so that the keyboard can scroll it too (and only such a frame: no needless tab stops).
function focusableScrollers() {
  document.querySelectorAll("main table.data, main figure, main .panel").forEach((frame) => {
    const scrolls = frame.scrollWidth > frame.clientWidth + 1;
    if (scrolls && !frame.hasAttribute("tabindex")) {
      frame.setAttribute("tabindex", "0");
      frame.dataset.scrollFocus = "";
    } else if (!scrolls && frame.dataset.scrollFocus !== undefined) {
      frame.removeAttribute("tabindex");
      delete frame.dataset.scrollFocus;
    }
  });
}
document.addEventListener("DOMContentLoaded", focusableScrollers);
document.addEventListener("htmx:afterSettle", focusableScrollers);
window.addEventListener("resize", focusableScrollers);
