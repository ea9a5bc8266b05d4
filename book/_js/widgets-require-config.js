// The ipywidgets HTML manager (embed-amd.js) loads its icon fonts from beside the AMD module it is
// defined as, which require.js would place under the page's own folder; point that module at the
// site's _static/widgets/, where the fonts are served. Runs after require.js, before embed-amd.js.
(function () {
  const staticFolder = document.currentScript.src.replace(/[^/]*([?#].*)?$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": staticFolder + "widgets" } });
})();
