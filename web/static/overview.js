// The Overview's chart: violations per bucket, one stacked series per threat type.
(function () {
  "use strict";
  const canvas = document.getElementById("violations-chart");
  const source = document.getElementById("chart-data");
  if (!canvas || !source || typeof Chart === "undefined") {
    return;
  }
  const data = JSON.parse(source.textContent);
  const colours = {
    spam: "#d08a1e",
    virus: "#a3161b",
    dha: "#2e5aa8",
    bounce: "#5b8c3a",
  };
  const datasets = data.series.map(function (pair) {
    return {
      label: pair[0],
      data: pair[1],
      backgroundColor: colours[pair[0]] || "#566073",
    };
  });
  new Chart(canvas, {
    type: "bar",
    data: { labels: data.labels, datasets: datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {
        x: { stacked: true },
        y: { stacked: true, beginAtZero: true, title: { display: true, text: "violations" } },
      },
    },
  });
})();
