from __future__ import annotations

import pytest

from fp_ray.schedule import inverted_paddings, make_plan, section_prompt


def plan(schedule, n, window=9, end=False, prompts=None):
    return make_plan(schedule, n, window, 8, 12, prompts or [(0.0, "p")], 1.2, has_end_image=end)


@pytest.mark.parametrize(
    "n,want",
    [(1, [0]), (2, [1, 0]), (4, [3, 2, 1, 0]), (5, [3, 2, 2, 1, 0]), (8, [3, 2, 2, 2, 2, 2, 1, 0])],
)
def test_inverted_padding_rule(n, want):
    assert inverted_paddings(n) == want
    p = plan("inverted", n)
    assert [s.layout.padding for s in p.sections] == [w * 9 for w in want]
    assert [s.position for s in p.sections] == list(reversed(range(n)))


@pytest.mark.parametrize("schedule", ["forward", "inverted", "bidirectional"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_plan_is_a_valid_dag(schedule, n):
    p = plan(schedule, n)
    assert sorted(s.position for s in p.sections) == list(range(n))  # each section exactly once
    assert [s.order for s in p.sections] == list(range(n))
    wave_of = {s.position: s.wave for s in p.sections}
    generated = set()
    for s in p.sections:
        assert set(s.depends_on) <= generated, "a section reads only sections generated before it"
        assert all(wave_of[d] < s.wave for d in s.depends_on), "waves are independent"
        generated.add(s.position)
    # decode chunks tile the latent video with one window of overlap between neighbours
    spans = [s.decode_span for s in p.by_position()]
    assert spans[0][0] == 0 and spans[-1][1] == p.latent_frames
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 - b0 == p.window


def test_bidirectional_waves_fill_between_neighbours():
    p = plan("bidirectional", 8)
    waves = [[s.position for s in w] for w in p.waves()]
    assert waves[0] == [7]  # the end section first
    assert waves[-1] == [0, 2, 4, 6]  # last wave: four independent fills
    assert len(waves) == 4  # log2 depth, not 8 sequential steps
    by_pos = {s.position: s for s in p.sections}
    fill = by_pos[4]
    assert fill.prefix == 3 and fill.history[0] == 5  # both neighbours
    assert fill.layout.padding == 0 and fill.layout.gap == 0
    mid = by_pos[3]
    assert mid.prefix is None and mid.history == (7,) and mid.layout.gap == 27  # gap to the end anchor, capped


def test_bidirectional_two_sections_is_inverted():
    b, i = plan("bidirectional", 2), plan("inverted", 2)
    for x, y in zip(b.sections, i.sections):
        assert (x.position, x.layout, x.history, x.prefix) == (y.position, y.layout, y.history, y.prefix)


def test_end_image_leads_first_generated_history():
    p = plan("inverted", 3, end=True)
    assert [s.history_starts_with_end for s in p.sections] == [True, False, False]
    with pytest.raises(ValueError, match="end image"):
        plan("forward", 3, end=True)


def test_timestamped_prompts_map_to_sections():
    prompts = [(0.0, "walk"), (2.0, "run"), (4.0, "stop")]
    p = plan("inverted", 5, prompts=prompts)
    by_pos = {s.position: s.prompt for s in p.sections}
    # section k starts at 1.2 k seconds
    assert [by_pos[k] for k in range(5)] == ["walk", "walk", "run", "run", "stop"]
    assert section_prompt(prompts, 1.99) == "walk"


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        plan("sideways", 3)
