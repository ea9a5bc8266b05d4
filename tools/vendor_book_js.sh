#!/usr/bin/env bash
# Refreshes the JavaScript the book serves itself, so saved widget views render with no network:
# require.js and the ipywidgets HTML manager, and MathJax for the equations, from the npm registry at
# exact versions. The files are committed under book/_vendor/ (a Sphinx static path, copied to
# _static/ in the build) so that building the book never needs the network. Run this only to change the versions.
set -euo pipefail
REQUIREJS=2.3.8
HTML_MANAGER=1.0.15
MATHJAX=3.2.2
cd "$(dirname "$0")/.."
target=book/_vendor/widgets
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "requirejs@$REQUIREJS" "@jupyter-widgets/html-manager@$HTML_MANAGER" "mathjax@$MATHJAX" >/dev/null)
mkdir -p "$work/requirejs" "$work/manager" "$work/mathjax"
tar xzf "$work/requirejs-$REQUIREJS.tgz" -C "$work/requirejs"
tar xzf "$work/jupyter-widgets-html-manager-$HTML_MANAGER.tgz" -C "$work/manager"
tar xzf "$work/mathjax-$MATHJAX.tgz" -C "$work/mathjax"
rm -rf book/_vendor && mkdir -p "$target" book/_vendor/mathjax
cp "$work/requirejs/package/require.js" "$target/require.js"
cp "$work/manager/package/dist/embed-amd.js" "$target/embed-amd.js"
# The icon fonts the widget styles load, next to the script that loads them (webpack's public path).
cp "$work/manager/package/dist/"*.woff2 "$target/"
# One file holding the TeX input and SVG output (no font files to fetch).
cp "$work/mathjax/package/es5/tex-svg.js" book/_vendor/mathjax/tex-svg.js
cat > book/_vendor/VERSIONS <<VERSIONS
requirejs@$REQUIREJS (require.js)
@jupyter-widgets/html-manager@$HTML_MANAGER (dist/embed-amd.js and its woff2 fonts; BSD-3-Clause)
mathjax@$MATHJAX (es5/tex-svg.js; Apache-2.0)
VERSIONS
(cd book/_vendor && find widgets mathjax -type f | sort | xargs sha256sum > SHA256SUMS)
cat book/_vendor/VERSIONS book/_vendor/SHA256SUMS
