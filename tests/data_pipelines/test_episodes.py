"""Episode-structured VIP / LIV samples over toy clip shards (data_pipelines/episodes.py)."""

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from data_pipelines.episodes import (
    STATE_NAMES,
    VipSampler,
    episode_table,
    make_episode_loader,
)
from data_pipelines.loader import ClipDataset
from experiments.training import clips
from flipjax.sharding import create_mesh
from tests.experiments.helpers import value_clip

CLIP_LEN = 3


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Eight 32x32 toy episodes (the shared :runlocal settings)."""
    out = tmp_path_factory.mktemp("episodes") / "train"
    config = value_clip.get_config("runlocal")
    clips.build_toy_clips(config, "train", out, clips.ClipSpec(
        image_size=(32, 32), horizon=4, history=CLIP_LEN, future=0, text_dim=32))
    return out


@pytest.fixture(scope="module")
def ds(toy_dir):
    return ClipDataset(toy_dir, history=CLIP_LEN, future=0)


@pytest.fixture(scope="module")
def frames(toy_dir):
    """Single frames by global clip index, read independently of the clip windows."""
    return ClipDataset(toy_dir, history=1, future=0)


def test_index_table_matches_the_clips(ds):
    index = ds.index_table()
    assert index.shape == (len(ds), 5)
    for i in (0, 5, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        episode_id, frame_index, length, start, _ = index[i]
        assert (item["episode_id"], item["frame_index"]) == (episode_id, frame_index)
        assert start == i - frame_index and 0 <= frame_index < length
        assert ds[int(start)]["frame_index"] == 0
        assert ds[int(start + length - 1)]["episode_id"] == episode_id
    table = episode_table(ds)
    assert table[:, 1].sum() == len(ds) and len(np.unique(table[:, 2])) == len(table)
    # Clips of one episode share an instruction; text_id equality means equal tokens.
    a, b = table[0], table[1]
    same = np.array_equal(ds[int(a[0])]["text_tokens"], ds[int(b[0])]["text_tokens"])
    assert same == (a[3] == b[3])


def test_samples_are_init_consecutive_pair_and_goal_of_one_episode(ds, frames):
    sampler = VipSampler(ds)
    rng = np.random.default_rng(0)
    for e in range(len(sampler)):
        start, length, episode_id, _ = (int(x) for x in sampler.episodes[e])
        s = sampler(e, rng)
        t = int(s["frame_index"][1])
        assert s["states"].shape == (4, CLIP_LEN, 32, 32, 3) and s["states"].dtype == np.uint8
        assert s["episode_id"] == episode_id
        np.testing.assert_array_equal(s["frame_index"], [0, t, t + 1, length - 1])
        assert 0 <= t <= length - 2
        init, state, nxt, goal = s["states"]
        # Each state ends on its frame; the init clip is frame 0 repeated (episode padding).
        for clip, end in zip(s["states"], s["frame_index"], strict=True):
            np.testing.assert_array_equal(clip[-1], frames[start + int(end)]["history"][0])
        np.testing.assert_array_equal(init, np.repeat(init[:1], CLIP_LEN, axis=0))
        # Consecutive states: the next clip is the current one shifted by one frame.
        np.testing.assert_array_equal(nxt[:-1], state[1:])
        np.testing.assert_array_equal(goal[-1], frames[start + length - 1]["history"][0])
    # t covers the range: both ends occur over many draws of one episode.
    length = int(sampler.episodes[0, 1])
    ts = {int(sampler(0, rng)["frame_index"][1]) for _ in range(400)}
    assert min(ts) == 0 and max(ts) == length - 2
    assert STATE_NAMES == ("init", "state", "next", "goal")


def test_value_curve_states_end_on_every_stride_frame(ds):
    sampler = VipSampler(ds)
    length = int(sampler.episodes[1, 1])
    states, ends = sampler.states(1, stride=4)
    assert ends[-1] == length - 1 and np.all(np.diff(ends) == 4) and ends[0] < 4
    assert states.shape == (len(ends), CLIP_LEN, 32, 32, 3)
    np.testing.assert_array_equal(states[-1], sampler.sample(1, 0)["states"][3])


def test_loader_batches_restore_exactly(ds):
    kw = dict(seed=3, process_index=0, process_count=1)
    a = make_episode_loader(ds, 4, **kw)
    for _ in range(3):
        next(a)
    state = a.get_state()
    want = [next(a) for _ in range(3)]
    b = make_episode_loader(ds, 4, **kw)
    b.set_state(state)
    got = [next(b) for _ in range(3)]
    for w, g in zip(want, got, strict=True):
        assert set(w) == {"states", "frame_index", "episode_id", "text_id", "text_tokens",
                          "text_mask"}
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    # Another seed draws other episodes or other pairs.
    c = make_episode_loader(ds, 4, seed=4, process_index=0, process_count=1)
    assert any(not np.array_equal(next(c)["frame_index"], w["frame_index"]) for w in want)


def test_processes_read_disjoint_episodes(ds):
    seen = []
    for p in range(2):
        ld = make_episode_loader(ds, 4, seed=0, num_epochs=1, process_index=p, process_count=2)
        ids = [int(i) for _ in range(ld.steps_per_epoch) for i in next(ld)["episode_id"]]
        assert len(ids) == len(set(ids)) == 4
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_small_datasets_fill_the_batch_and_arrays_are_global(ds):
    mesh = create_mesh(data=4, fsdp=2)
    # 8 episodes, batch 16: every episode twice per epoch.
    ld = make_episode_loader(ds, 16, mesh=mesh, seed=0)
    b = next(ld)
    assert isinstance(b["states"], jax.Array) and b["states"].shape == (16, 4, CLIP_LEN, 32, 32,
                                                                        3)
    assert len(b["states"].sharding.device_set) == 8
    ids = np.asarray(b["episode_id"])
    assert sorted(np.unique(ids, return_counts=True)[1]) == [2] * 8


def test_sampler_rejects_unusable_datasets(toy_dir, ds):
    with pytest.raises(ValueError, match="future=0"):
        VipSampler(ClipDataset(toy_dir, history=2, future=1))
    with pytest.raises(ValueError, match="no episode of at least 10000 frames"):
        VipSampler(ds, min_length=10_000)
    with pytest.raises(ValueError, match=r"t=99 not in"):
        VipSampler(ds).sample(0, 99)
