"""Chapter 06: the interpretability references, the checks (right answers pass, each named mistake is
named in one sentence), and the offline bertviz HTML (no CDN, libraries inlined, long inputs cut)."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of, rejection

from utils import interpret, viz
from utils.checks import ch06

# ---------------------------------------------------------------- the references


def softmax_rows(*shape, causal=False, seed=0):
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if causal:
        length = shape[-1]
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def test_previous_token_score_of_known_heads():
    shifted = torch.diag(torch.ones(4), -1)
    shifted[0, 0] = 1.0
    assert interpret.previous_token_score(shifted).item() == 1.0
    assert interpret.previous_token_score(torch.eye(5)).item() == 0.0
    assert interpret.self_score(torch.eye(5)).item() == 1.0
    uniform_causal = torch.ones(6, 6).tril()
    uniform_causal = uniform_causal / uniform_causal.sum(-1, keepdim=True)
    expected = sum(1 / (t + 1) for t in range(1, 6)) / 5
    assert interpret.previous_token_score(uniform_causal).item() == pytest.approx(expected)


def test_head_scores_and_classification():
    tokens = ["[CLS]", "the", "cat", ",", "sat", ".", "[SEP]"]
    to_cls = torch.zeros(1, 2, 7, 7)
    to_cls[0, 0, :, 0] = 1.0  # head 0: everything on [CLS]
    to_cls[0, 1] = torch.diag(torch.ones(6), -1)
    to_cls[0, 1, 0, 0] = 1.0  # head 1: the previous token
    scores = interpret.head_scores([to_cls], tokens)
    assert set(scores) == {"previous token", "self", "next token", "first token", "[SEP]", "punctuation"}
    assert scores["first token"][0, 0].item() == 1.0 and scores["previous token"][0, 1].item() == 1.0
    found = interpret.classify_heads(scores, threshold=0.9)
    assert [(layer, head, name) for layer, head, name, _ in found] == [(0, 0, "first token"), (0, 1, "previous token")]
    assert interpret.is_punctuation(",") and interpret.is_punctuation("?!") and not interpret.is_punctuation("[SEP]")


def test_rollout_follows_the_definition():
    attentions = softmax_rows(3, 2, 5, 5, seed=1)
    rollout = interpret.attention_rollout(attentions)
    maps = [(a.mean(0) + torch.eye(5)) / 2 for a in attentions]  # rows of A sum to 1, so A + I sums to 2
    assert torch.allclose(rollout, maps[2] @ maps[1] @ maps[0], atol=1e-6)
    assert torch.allclose(rollout.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(interpret.attention_rollout(list(attentions)), rollout)


def test_rollout_of_a_causal_model_stays_causal():
    rollout = interpret.attention_rollout(softmax_rows(4, 3, 6, 6, causal=True, seed=2))
    assert torch.equal(rollout.triu(1), torch.zeros(6, 6))


def test_gradient_times_input_on_a_linear_model_adds_up_to_the_logit():
    weights = torch.randn(3, 4, dtype=torch.float64)
    embeddings = torch.randn(5, 3, dtype=torch.float64)
    scores = interpret.gradient_times_input(lambda e: e.cumsum(0) @ weights, embeddings, target=2)
    assert scores.shape == (5,) and not scores.requires_grad
    assert scores.sum().item() == pytest.approx((embeddings.sum(0) @ weights)[2].item())
    assert torch.allclose(scores, embeddings @ weights[:, 2])


def test_saliency_of_the_course_model_leaves_its_weights_alone():
    from utils.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context_length=16, n_layer=2, n_head=2, d_model=16)).eval()
    ids = torch.randint(0, 11, (1, 9))
    embeddings, logits_fn = interpret.as_function_of_embeddings(model, ids)
    assert torch.equal(logits_fn(embeddings), model(ids)[0][0])
    scores = interpret.saliency(model, ids, target=3)
    assert scores.shape == (9,) and torch.isfinite(scores).all()
    assert all(p.grad is None for p in model.parameters())
    assert not model.token_embedding._forward_hooks  # the hook is removed after each call


def test_linear_probe_reads_a_linear_label():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 5, generator=generator, dtype=torch.float64)
    labels = (features[:, 0] + 0.5 * features[:, 3] > 0.2).long()
    weights = interpret.fit_linear_probe(features, labels, 2, ridge=0.1)
    assert weights.shape == (6, 2)
    assert interpret.probe_accuracy(weights, features, labels) > 0.85
    assert interpret.probe_accuracy(weights, torch.randn(300, 5, dtype=torch.float64), labels) < 0.7


def test_attention_maps_of_both_kinds_of_model():
    from utils.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, context_length=16, n_layer=2, n_head=2, d_model=16)).eval()
    attentions, states = interpret.attention_maps(model, torch.randint(0, 11, (1, 7)))
    assert len(attentions) == 2 and attentions[0].shape == (1, 2, 7, 7) and len(states) == 3


# ---------------------------------------------------------------- exercise 1: previous-token score


def previous_by_indexing(weights):
    length = weights.shape[-1]
    rows = torch.arange(1, length)
    return weights[..., rows, rows - 1].sum(-1) / (length - 1)


def test_previous_token_score_accepts_correct_answers(capsys):
    for correct in (copy_of(interpret.previous_token_score), previous_by_indexing):
        ch06.check_previous_token_score(correct)
        ch06.check_previous_token_score(correct, cases=20, seed=7)
    assert "✓" in capsys.readouterr().out


def test_previous_token_score_mistakes_are_named():
    def main_diagonal(weights):
        return torch.diagonal(weights, dim1=-2, dim2=-1).mean(-1)

    def next_token(weights):
        return torch.diagonal(weights, offset=1, dim1=-2, dim2=-1).mean(-1)

    def over_t(weights):
        return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).sum(-1) / weights.shape[-1]

    def wraps_around(weights):
        rows = torch.arange(weights.shape[-1])
        return weights[..., rows, rows - 1].mean(-1)

    assert "on itself" in rejection(ch06.check_previous_token_score, main_diagonal)
    assert "next token" in rejection(ch06.check_previous_token_score, next_token)
    assert "divided by T" in rejection(ch06.check_previous_token_score, over_t)
    assert "wraps around" in rejection(ch06.check_previous_token_score, wraps_around)


def test_previous_token_score_forbids_the_course_function():
    assert "shortcut" in rejection(ch06.check_previous_token_score, lambda w: interpret.previous_token_score(w))


# ---------------------------------------------------------------- exercise 2: rollout


def rollout_by_hand(attentions):
    length = attentions.shape[-1]
    result = torch.eye(length, dtype=attentions.dtype)
    for layer in attentions:
        mixed = 0.5 * layer.mean(0) + 0.5 * torch.eye(length, dtype=attentions.dtype)
        result = mixed @ result
    return result


def test_rollout_accepts_correct_answers(capsys):
    for correct in (copy_of(interpret.attention_rollout), rollout_by_hand):
        ch06.check_attention_rollout(correct)
        ch06.check_attention_rollout(correct, cases=20, seed=8)
        ch06.check_rollout_rows(correct)
    assert "✓" in capsys.readouterr().out


def _layers(attentions, residual=True, normalise=True):
    maps = attentions.mean(1)
    if residual:
        maps = maps + torch.eye(maps.shape[-1], dtype=maps.dtype)
    if normalise:
        maps = maps / maps.sum(-1, keepdim=True)
    return maps


def test_rollout_mistakes_are_named():
    def wrong_order(attentions):
        maps = _layers(attentions)
        result = maps[0]
        for layer in maps[1:]:
            result = result @ layer
        return result

    def no_residual(attentions):
        maps = _layers(attentions, residual=False)
        result = maps[0]
        for layer in maps[1:]:
            result = layer @ result
        return result

    def not_renormalised(attentions):
        maps = _layers(attentions, normalise=False)
        result = maps[0]
        for layer in maps[1:]:
            result = layer @ result
        return result

    assert "wrong order" in rejection(ch06.check_attention_rollout, wrong_order)
    assert "residual" in rejection(ch06.check_attention_rollout, no_residual)
    assert "renormalise" in rejection(ch06.check_attention_rollout, not_renormalised)
    assert "sum to 1" in rejection(ch06.check_rollout_rows, not_renormalised)


def test_rollout_forbids_the_course_function():
    assert "shortcut" in rejection(ch06.check_attention_rollout, lambda a: interpret.attention_rollout(a))


# ---------------------------------------------------------------- exercise 3: gradient × input


def saliency_with_backward(logits_fn, embeddings, target):
    x = embeddings.detach().clone().requires_grad_(True)
    logits_fn(x)[-1, target].backward()
    return (x.grad * x).sum(-1).detach()


def test_saliency_accepts_correct_answers(capsys):
    for correct in (copy_of(interpret.gradient_times_input), saliency_with_backward):
        ch06.check_gradient_times_input(correct)
        ch06.check_gradient_times_input(correct, cases=15, seed=9)
        ch06.check_saliency_completeness(correct)
    assert "✓" in capsys.readouterr().out


def _gradient(logits_fn, embeddings, score):
    x = embeddings.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(logits_fn(x)), x)
    return grad, x.detach()


def test_saliency_mistakes_are_named():
    def gradient_only(logits_fn, embeddings, target):
        grad, _ = _gradient(logits_fn, embeddings, lambda logits: logits[-1, target])
        return grad.sum(-1)

    def l2_norm(logits_fn, embeddings, target):
        grad, x = _gradient(logits_fn, embeddings, lambda logits: logits[-1, target])
        return (grad * x).norm(dim=-1)

    def largest_logit(logits_fn, embeddings, target):
        grad, x = _gradient(logits_fn, embeddings, lambda logits: logits[-1].max())
        return (grad * x).sum(-1)

    def every_position(logits_fn, embeddings, target):
        grad, x = _gradient(logits_fn, embeddings, lambda logits: logits[:, target].sum())
        return (grad * x).sum(-1)

    def of_the_loss(logits_fn, embeddings, target):
        grad, x = _gradient(logits_fn, embeddings,
                            lambda logits: F.cross_entropy(logits[-1:], torch.tensor([target])))
        return (grad * x).sum(-1)

    assert "without multiplying it by the input" in rejection(ch06.check_gradient_times_input, gradient_only)
    assert "L2 norm of gradient × input" in rejection(ch06.check_gradient_times_input, l2_norm)
    assert "instead of the logit of `target`" in rejection(ch06.check_gradient_times_input, largest_logit)
    assert "every position" in rejection(ch06.check_gradient_times_input, every_position)
    assert "cross-entropy loss" in rejection(ch06.check_gradient_times_input, of_the_loss)


def test_saliency_forbids_the_course_function():
    assert "shortcut" in rejection(ch06.check_gradient_times_input,
                                   lambda f, e, t: interpret.gradient_times_input(f, e, t))


# ---------------------------------------------------------------- exercise 4: linear probe


def probe_with_lstsq(features, labels, num_classes, ridge):
    inputs = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
    stacked = torch.cat([inputs, ridge ** 0.5 * torch.eye(inputs.shape[1], dtype=features.dtype)])
    targets = torch.cat([F.one_hot(labels, num_classes).to(features.dtype),
                         torch.zeros(inputs.shape[1], num_classes, dtype=features.dtype)])
    return torch.linalg.lstsq(stacked, targets).solution


def test_probe_accepts_correct_answers(capsys):
    for correct in (copy_of(interpret.fit_linear_probe), probe_with_lstsq):
        ch06.check_fit_linear_probe(correct)
        ch06.check_fit_linear_probe(correct, cases=15, seed=10)
    assert "✓" in capsys.readouterr().out


def test_probe_mistakes_are_named():
    def solve(inputs, targets, ridge):
        return torch.linalg.solve(inputs.T @ inputs + ridge * torch.eye(inputs.shape[1], dtype=inputs.dtype),
                                  inputs.T @ targets)

    def no_bias(features, labels, num_classes, ridge):
        return solve(features, F.one_hot(labels, num_classes).to(features.dtype), ridge)

    def class_numbers(features, labels, num_classes, ridge):
        inputs = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
        return solve(inputs, labels.to(features.dtype), ridge)

    def no_ridge(features, labels, num_classes, ridge):
        inputs = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
        return solve(inputs, F.one_hot(labels, num_classes).to(features.dtype), 0.0)

    assert "no bias row" in rejection(ch06.check_fit_linear_probe, no_bias)
    assert "regressed the class numbers" in rejection(ch06.check_fit_linear_probe, class_numbers)
    assert "left out the ridge term" in rejection(ch06.check_fit_linear_probe, no_ridge)


# ---------------------------------------------------------------- the offline bertviz views


def small_attention(layers=2, heads=3, length=6, seed=3):
    return [softmax_rows(1, heads, length, length, causal=True, seed=seed + i) for i in range(layers)]


@pytest.mark.parametrize("view", ["head", "model"])
def test_bertviz_html_needs_no_network(view):
    html = viz.bertviz_html(small_attention(), list("abcdef"), view)
    assert "cdnjs" not in html and "require.js" not in html and "<script src" not in html
    assert "require.config(" not in html  # bertviz's CDN paths are gone; its requirejs call is served locally
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.DOTALL)
    assert len(scripts) == 1, "one self-contained script"
    assert "d3js.org v5" in scripts[0] and "jQuery" in scripts[0]  # both libraries inlined
    assert "var requirejs = function" in scripts[0] and "var require = {config" in scripts[0]
    assert html.count("course-bertviz-pending") == 2  # the note the script removes once it has drawn


def test_bertviz_offline_scripts_come_from_installed_packages():
    assert viz.offline_script("d3").startswith("// https://d3js.org v5")
    assert "jQuery" in viz.offline_script("jquery")[:200] or "jquery" in viz.offline_script("jquery")[:400]


def test_bertviz_html_cuts_long_inputs_with_a_notice():
    html = viz.bertviz_html(small_attention(layers=1, heads=1, length=80), [f"t{i}" for i in range(80)], "head",
                            max_tokens=20)
    assert "Showing the first 20 of 80 tokens." in html
    assert '"t19"' in html and '"t20"' not in html


def test_bertviz_html_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match="got 3 tokens"):
        viz.bertviz_html(small_attention(), ["a", "b", "c"], "head")


def test_offline_rewrite_refuses_an_unknown_layout():
    with pytest.raises(RuntimeError, match="bertviz"):
        viz.offline_bertviz("<div>not bertviz</div>")


def test_head_explorer_draws_without_a_browser():
    import matplotlib

    matplotlib.use("Agg")
    attentions = small_attention(layers=2, heads=2, length=70)
    explorer = viz.head_explorer(attentions, [f"c{i}" for i in range(70)], max_tokens=32)
    assert explorer.children[0].value == "Showing the first 32 of 70 tokens."
    figure = explorer.update(layer=1, head=1, query=5, view="heatmap")
    assert figure is not None and explorer.weights.shape == (32, 32)
    assert torch.equal(explorer.weights, attentions[1][0, 1, :32, :32])


def test_attention_heatmap_and_saliency_html():
    import matplotlib

    matplotlib.use("Agg")
    figure = viz.attention_heatmap(small_attention(heads=4), list("abcdef"), layer=1)
    assert len([ax for ax in figure.axes if ax.images]) == 4
    shaded = viz.saliency_html(list("ab c"), torch.tensor([1.0, -0.5, 0.0, 0.25]), title="t").data
    assert "rgba(214,39,40,1.00)" in shaded and "rgba(31,119,180,0.50)" in shaded and "␣" in shaded


def test_attention_explorer_of_chapter_02_still_cuts_long_inputs():
    import matplotlib

    matplotlib.use("Agg")
    q = torch.randn(70, 4)
    explorer = viz.attention_explorer([f"w{i}" for i in range(70)], q, q, max_tokens=16)
    assert explorer.children[0].value == "Showing the first 16 of 70 tokens."


def test_saved_views_render_in_a_static_page_with_no_network(tmp_path):
    """A notebook's saved bertviz outputs, exported by nbconvert as the book and "download as HTML" do,
    draw their SVG in an offline Chromium: nothing but the view's own inlined code is needed."""
    import http.server
    import threading
    from functools import partial

    import nbformat
    from browser import chromium_page, free_port
    from nbconvert import HTMLExporter

    notebook = nbformat.v4.new_notebook()
    for view in (viz.head_view, viz.model_view):
        cell = nbformat.v4.new_code_cell("view")
        shown = view(small_attention(layers=2, heads=3, length=8), [f"w{i}" for i in range(8)])
        cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": shown.data, "text/plain": "view"})]
        notebook.cells.append(cell)
    page_html, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    (tmp_path / "index.html").write_text(page_html)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with chromium_page() as (page, problems):
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
            page.wait_for_timeout(1000)
            assert page.locator(".course-bertviz #vis svg").count() == 2
            assert page.locator(".course-bertviz-pending").count() == 0
            # nbconvert's own template asks a CDN for require.js and MathJax; the views need neither.
            assert not [p for p in problems if p.startswith("page error")], problems
            assert not [p for p in problems if "d3" in p or "jquery" in p.lower()], problems
    finally:
        httpd.shutdown()
