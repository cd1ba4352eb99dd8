from PIL import Image

from fdfo.runs.plots import plot_reward_curve, reward_panels


def epoch_record(epoch, terms):
    record = {"kind": "epoch", "epoch": epoch, "reward_evaluations": 16 * (epoch + 1), "reward_mean": 1.0 + epoch,
              "reward_std": 0.5, "time_epoch": 3.0}
    for name in terms:
        record |= {f"reward_{name}": 2.0 + epoch, f"reward_{name}_std": 0.1}
    return record


def test_one_panel_per_term_and_one_for_the_total():
    assert reward_panels(epoch_record(0, ["brightness"])) == [("reward", "reward (brightness)")]
    assert reward_panels(epoch_record(0, ["pickscore", "vlm_alignment"])) == [
        ("reward", "total reward"), ("reward_pickscore", "pickscore"), ("reward_vlm_alignment", "vlm_alignment")]


def test_reward_curve_is_drawn_for_one_and_for_several_terms(tmp_path):
    plot_reward_curve([epoch_record(e, ["brightness"]) for e in range(3)], tmp_path / "one.png")
    plot_reward_curve([epoch_record(e, ["pickscore", "vlm_alignment"]) for e in range(3)], tmp_path / "three.png")
    one, three = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "three.png")
    assert one.format == three.format == "PNG"
    assert three.width > 2.5 * one.width  # three panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "three.png"]  # no temporary file left
