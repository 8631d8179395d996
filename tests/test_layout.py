"""Layout: JSON round trip, every validation error, soft occupancy rasters."""

from __future__ import annotations

import json

import pytest
import torch

from diffattn.layout import Instance, Layout, LayoutError, background_map, occupancy, occupancy_pyramid, unet_resolutions

EXAMPLE = {
    "background": "a blue background",
    "instances": [
        {"phrase": "a red circle", "box": [0.1, 0.1, 0.4, 0.4]},
        {"phrase": "a green triangle", "polygon": [[0.6, 0.9], [0.8, 0.5], [0.95, 0.9]]},
    ],
}


def test_json_round_trip(tmp_path):
    layout = Layout.from_dict(EXAMPLE)
    assert layout.to_dict() == EXAMPLE
    assert Layout.from_json(layout.to_json()) == layout
    path = tmp_path / "layout.json"
    layout.save(path)
    assert Layout.load(path) == layout
    assert json.loads(path.read_text()) == EXAMPLE
    assert Layout.coerce(str(path)) == layout and Layout.coerce(EXAMPLE) == layout
    assert layout.phrases == ["a red circle", "a green triangle"]
    assert layout.boxes[1] == (0.6, 0.5, 0.95, 0.9)


def _instances(*items):
    return {"instances": list(items)}


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "JSON object"),
        ({"instances": [], "extra": 1}, "unknown layout key"),
        ({"instances": "x"}, "'instances' must be a list"),
        ({"instances": []}, "at least one instance"),
        (_instances("box"), "instance 0 must be an object"),
        (_instances({"phrase": "a", "box": [0, 0, 1, 1], "color": 1}), "unknown key"),
        (_instances({"phrase": "", "box": [0, 0, 1, 1]}), "non-empty string"),
        (_instances({"phrase": "   ", "box": [0, 0, 1, 1]}), "non-empty string"),
        (_instances({"phrase": 3, "box": [0, 0, 1, 1]}), "non-empty string"),
        (_instances({"phrase": "a"}), "exactly one of 'box' or 'polygon'"),
        (_instances({"phrase": "a", "box": [0, 0, 1, 1], "polygon": [[0, 0], [1, 0], [0, 1]]}), "exactly one"),
        (_instances({"phrase": "a", "box": [0, 0, 1]}), r"\[x0, y0, x1, y1\]"),
        (_instances({"phrase": "a", "box": "0,0,1,1"}), r"'box' must be"),
        (_instances({"phrase": "a", "box": [0, 0, 1.2, 1]}), r"x1=1.2 is outside \[0, 1\]"),
        (_instances({"phrase": "a", "box": [-0.1, 0, 1, 1]}), r"x0=-0.1 is outside"),
        (_instances({"phrase": "a", "box": [0, 0, 1, 1.5]}), r"y1=1.5 is outside"),
        (_instances({"phrase": "a", "box": [0.5, 0, 0.5, 1]}), "x0 < x1"),
        (_instances({"phrase": "a", "box": [0, 0.6, 1, 0.2]}), "y0 < y1"),
        (_instances({"phrase": "a", "box": [0, "a", 1, 1]}), "must be a number"),
        (_instances({"phrase": "a", "box": [0, float("nan"), 1, 1]}), "finite"),
        (_instances({"phrase": "a", "polygon": [[0, 0], [1, 1]]}), "at least 3"),
        (_instances({"phrase": "a", "polygon": [[0, 0], [1, 1], [0.5]]}), r"must be \[x, y\]"),
        (_instances({"phrase": "a", "polygon": [[0, 0], [1.5, 1], [0, 1]]}), "outside"),
        (_instances({"phrase": "a", "polygon": [[0, 0], [0.5, 0.5], [1, 1]]}), "zero area"),
        (_instances({"phrase": "a", "polygon": "x"}), "list of"),
        ({"background": "", "instances": [{"phrase": "a", "box": [0, 0, 1, 1]}]}, "background"),
    ],
)
def test_validation_errors(data, message):
    with pytest.raises(LayoutError, match=message):
        Layout.from_dict(data)


def test_too_many_instances_and_bad_json():
    items = [{"phrase": f"p{i}", "box": [0, 0, 1, 1]} for i in range(4)]
    with pytest.raises(LayoutError, match="at most 3 instances, got 4"):
        Layout.from_dict({"instances": items}, max_instances=3)
    assert len(Layout.from_dict({"instances": items}).instances) == 4
    with pytest.raises(LayoutError, match="not valid JSON"):
        Layout.from_json("{nope")
    with pytest.raises(LayoutError, match="neither JSON nor an existing file"):
        Layout.coerce("/no/such/layout.json")
    assert isinstance(LayoutError("x"), ValueError)


def test_box_occupancy_is_area_fraction():
    # A box from 0.1 to 0.4 on a 10-cell axis covers cells 1..3 fully; on 4 cells: 0.6, 1, 0.0... per axis
    layout = Layout((Instance("a", box=(0.1, 0.1, 0.4, 0.4)),))
    m = occupancy(layout, 10, 10, supersample=8)[0]
    assert m.shape == (10, 10)
    assert torch.allclose(m[1:4, 1:4], torch.ones(3, 3)) and m.sum() == 9
    m4 = occupancy(layout, 4, 4, supersample=8)[0]  # cells of 0.25: [0, .25) and [.25, .5) are each 60% covered
    axis = torch.tensor([0.625, 0.625, 0.0, 0.0])  # 5 of the 8 sample points per axis
    assert torch.allclose(m4, axis[:, None] * axis[None, :])
    # The covered area is the same at every resolution (up to the sampling grid)
    for h, w in unet_resolutions(64, 48):
        total = occupancy(layout, h, w, supersample=16)[0].sum() / (h * w)
        assert abs(float(total) - 0.09) < 0.02


def test_polygon_occupancy_and_background():
    tri = Layout((Instance("t", polygon=((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))),))
    m = occupancy(tri, 32, 32, supersample=8)[0]
    assert abs(float(m.mean()) - 0.5) < 0.01
    assert m[0, 0] == 1 and m[-1, -1] == 0
    two = Layout.from_dict(EXAMPLE)
    pyr = occupancy_pyramid(two, 16, 16)
    assert list(pyr) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    maps = pyr[(16, 16)]
    bg = background_map(maps)
    assert bg.shape == (16, 16) and torch.all((bg >= 0) & (bg <= 1))
    assert torch.allclose(bg, 1 - maps.max(0).values)
