// The Suspicious IP log's small helpers, kept out of the page for its CSP.
(function () {
  "use strict";
  // "tick every row" ticks (or clears) every box named by its data-ticks
  document.querySelectorAll("input[data-ticks]").forEach(function (all) {
    all.addEventListener("click", function () {
      document.getElementsByName(all.dataset.ticks).forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });
  // a choice that shows at once, such as logs per page
  document.querySelectorAll("select[data-submit-on-change]").forEach(function (choice) {
    choice.addEventListener("change", function () {
      choice.form.submit();
    });
  });
})();
