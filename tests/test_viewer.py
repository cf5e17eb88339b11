"""The particle viewer (issue 17, item 5): the page, parsed with html.parser, shows the right texts, normalised
weights and lines of descent, for hand-made ancestors and for a real SMC run."""

from html.parser import HTMLParser

import jax
import numpy as np
import pytest

import pplalign
from pplalign.viewer import lineage, view, write_html


class _Rows(HTMLParser):
    """Collects every <tr class="particle"> (its data-* attributes and its text cell) and the page's tags."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags, self._in_text, self.summary = [], set(), False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "tr" and attrs.get("class") == "particle":
            self.rows.append(dict(attrs, text=""))
        if tag == "td" and attrs.get("class") == "text":
            self._in_text = True
        if tag == "p" and attrs.get("class") == "summary":
            self.summary = attrs
        for key in ("src", "href"):
            assert key not in attrs, f"an external asset: {tag} {attrs}"

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_text = False

    def handle_data(self, data):
        if self._in_text:
            self.rows[-1]["text"] += data


def _parse(page):
    parser = _Rows()
    parser.feed(page)
    return parser


def _fake_particles():
    """N = 4, T = 3 with known resamplings after steps 0 and 1."""
    ancestors = np.array([[0, 0, 2, 2],   # after step 0: slots 0,1 ← 0 and slots 2,3 ← 2
                          [1, 1, 3, 2],   # after step 1
                          [0, 1, 2, 3]])  # last step: identity
    samples = np.array([[1, 2, 3], [1, 2, 4], [5, 6, 7], [5, 8, 9]])
    log_w = np.log(np.array([0.1, 0.2, 0.3, 0.4])) + 2.0  # unnormalised on purpose
    return pplalign.Particles(samples, log_w, np.float32(-1.5), np.ones(3), ancestors, np.int32(12))


def test_lineage_follows_the_ancestors_backwards():
    # final 0 ← slot 1 after step 1 ← slot 0 at step 0; final 2 ← 3 ← 2; final 3 ← 2 ← 2
    np.testing.assert_array_equal(lineage(_fake_particles().ancestors),
                                  [[0, 1, 0], [0, 1, 1], [2, 3, 2], [2, 2, 3]])


def test_page_has_texts_weights_and_lineage(tmp_path):
    words = {1: "a", 2: "b", 3: "c", 4: "d<&>", 5: "e", 6: "f", 7: "g", 8: "h", 9: "i"}
    decode = lambda x: " ".join(words[int(i)] for i in x)
    path = write_html(tmp_path / "run.html", _fake_particles(), decode, title="fake")
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert {"html", "style", "svg", "table"} <= parsed.tags and "<script" not in page
    by_index = {int(r["data-index"]): r for r in parsed.rows}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert [int(r["data-index"]) for r in parsed.rows] == [3, 2, 1, 0]  # heaviest first
    np.testing.assert_allclose([float(by_index[i]["data-weight"]) for i in range(4)], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    assert by_index[1]["text"] == "a b d<&>"  # escaped in the page, the same text once parsed
    assert by_index[3]["data-lineage"] == "2 2 3"
    assert parsed.summary["data-resampled-steps"] == "0 1" and parsed.summary["data-log-z"] == "-1.5"


def test_notebook_display_and_a_real_run(markov):
    """``_repr_html_`` of a real SMC run on the Markov testbed: one row per particle, the rows' lineages equal
    :func:`lineage` of the run's ancestors, the weights its normalised weights."""
    lm, reward, beta = markov
    # the exact twist as Feynman–Kac potentials with proposals from p₀: weights vary at every step, so the
    # resamplings after each step really merge lines
    parts = pplalign.smc(jax.random.key(0), pplalign.tilt(lm, reward, beta), 16, ess_threshold=1.0,
                         twist=lm.optimal_twist(reward, beta), proposal=lm.transition)
    fragment = view(parts, lambda x: "".join("abcd"[int(i)] for i in x))._repr_html_()
    assert fragment.startswith('<div class="pv">')
    rows = {int(r["data-index"]): r for r in _parse(fragment).rows}
    lines = lineage(parts.ancestors)
    assert len(set(lines[:, 0].tolist())) < 16  # resampling merged some lines
    w = np.asarray(parts.normalized_weights)
    for i, r in rows.items():
        assert r["data-lineage"] == " ".join(map(str, lines[i]))
        assert float(r["data-weight"]) == pytest.approx(float(w[i]), rel=1e-5, abs=1e-9)
        assert r["text"] == "".join("abcd"[int(v)] for v in np.asarray(parts.samples[i]))


def test_all_zero_weights_and_bad_shapes():
    p = _fake_particles()._replace(log_weights=np.full(4, -np.inf))
    rows = _parse(view(p).html).rows
    assert all(float(r["data-weight"]) == 0.0 for r in rows)
    with pytest.raises(ValueError, match="disagree"):
        view(p, tokens=np.zeros((3, 3)))
