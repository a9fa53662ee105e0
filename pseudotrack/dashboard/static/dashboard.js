(function () {
  "use strict";
  var seconds = Number(document.body.dataset.refresh);
  var version = document.body.dataset.fingerprint;
  var live = document.getElementById("live");
  if (!(seconds > 0)) return;
  function poll() {
    fetch("api/summary", {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) {
        if (data.fingerprint !== version) { location.reload(); return; }
        live.textContent = "no change since " + new Date().toLocaleTimeString();
        setTimeout(poll, seconds * 1000);
      })
      .catch(function (err) {
        live.textContent = "cannot reach the dashboard server (" + err.message + ")";
        setTimeout(poll, seconds * 1000);
      });
  }
  setTimeout(poll, seconds * 1000);
})();
