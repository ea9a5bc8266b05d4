// The widget views' code (@jupyter-widgets/controls, inside embed-amd.js) typesets labels with
// MathJax 2's `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`; the book loads MathJax 3,
// which has no Hub, so every widget with a label would throw. This gives whatever object holds
// `window.MathJax` (Sphinx's configuration first, MathJax 3 itself once it has loaded) a `Hub`
// whose Queue forwards to MathJax 3's typesetPromise, now or once MathJax has started.
(function () {
  function typeset(element) {
    const mathjax = window.MathJax;
    if (mathjax && typeof mathjax.typesetPromise === "function") {
      return mathjax.typesetPromise([element]).catch(() => {});
    }
    if (mathjax && mathjax.startup && mathjax.startup.promise) {
      return mathjax.startup.promise.then(() => typeset(element));
    }
    return undefined; // MathJax has not loaded yet: its first pass typesets the whole page anyway
  }
  const hub = {
    Queue(...items) {
      for (const item of items) {
        if (Array.isArray(item) && item[0] === "Typeset" && item[2]) typeset(item[2]);
      }
    },
  };
  let current = window.MathJax;
  function withHub(value) {
    if (value && typeof value === "object" && !value.Hub) {
      Object.defineProperty(value, "Hub", { value: hub, enumerable: false, configurable: true });
    }
    return value;
  }
  withHub(current);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get() { return current; },
    set(value) { current = withHub(value); },
  });
})();
