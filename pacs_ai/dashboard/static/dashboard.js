// pacs-ai dashboard: refresh the changing part of the page (#panels) from /panels every
// data-refresh seconds while the page is visible. No framework; nothing leaves this origin.
(function () {
  "use strict";
  var period = parseFloat(document.body.dataset.refresh || "0");
  var panels = document.getElementById("panels");
  var banner = document.getElementById("connection");
  if (!panels || !(period > 0)) {
    return;
  }
  var busy = false;

  function refresh() {
    if (busy || document.hidden) {
      return;
    }
    // Do not pull a form away from under the user's pointer or keyboard.
    var active = document.activeElement;
    if (active && active !== document.body && panels.contains(active)) {
      return;
    }
    busy = true;
    fetch("/panels", { credentials: "same-origin", headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok && response.status !== 503) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        panels.innerHTML = html;
        if (banner) {
          banner.hidden = true;
        }
      })
      .catch(function () {
        if (banner) {
          banner.hidden = false;
        }
      })
      .finally(function () {
        busy = false;
      });
  }

  window.setInterval(refresh, period * 1000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      refresh();
    }
  });
})();
