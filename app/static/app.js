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
