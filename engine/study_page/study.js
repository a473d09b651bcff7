// The study page's only script (served by fspo-engine; the pages also work without it).
(function () {
  "use strict";
  // One answer per click: after a form is submitted its buttons are disabled. Deferred, so that the
  // clicked button's own name=value still goes with the form.
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function () {
      setTimeout(function () {
        form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
      }, 0);
    });
  });
  // "Preparing answers": ask the server every 1.5 s whether the next question is ready, then reload.
  if (document.body.dataset.page === "preparing") {
    var poll = function () {
      fetch("/status", { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : { state: "preparing" }; })
        .then(function (s) {
          if (s.state !== "preparing") { window.location.reload(); } else { setTimeout(poll, 1500); }
        })
        .catch(function () { setTimeout(poll, 3000); });
    };
    setTimeout(poll, 1500);
  }
})();
