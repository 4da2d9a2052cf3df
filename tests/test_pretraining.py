"""Targets of the scene backbone's pretraining, against plain loops over the scene."""
import numpy as np
import torch

from pipeline.data.synthetic import Scene, SceneObject, instance_map
from pipeline.models.backbones import SceneResNet
from pipeline.models.pretraining import (CELL_LABELS, COUNT_LABELS, NUM_CELL_LABELS, NUM_LABELS,
                                         PRESENCE_LABELS, cell_targets, evaluate, pretraining_loss,
                                         scene_targets)

SCENE = Scene(1, 64, 64, [
    SceneObject(0, "circle", "red", "large", (24, 24), 9.0),
    SceneObject(1, "square", "red", "small", (50, 8), 6.0),
    SceneObject(2, "circle", "blue", "small", (40, 50), 6.0),
])


def test_scene_targets():
    presence, counts = scene_targets(SCENE)
    on = {PRESENCE_LABELS[i] for i in np.flatnonzero(presence)}
    assert on == {"shape:circle", "shape:square", "color:red", "color:blue",
                  "red circle", "red square", "blue circle"}
    by_name = dict(zip(COUNT_LABELS, counts))
    assert by_name["count:circle"] == 2 and by_name["count:red"] == 2 and by_name["count:square"] == 1
    assert by_name["count:blue"] == 1 and by_name["count:green"] == 0


def test_cell_targets_are_the_majority_object_of_each_cell():
    instances = instance_map(SCENE)
    grid = 4
    cells = cell_targets(instances, SCENE, grid)
    size = 64 // grid
    for y in range(grid):
        for x in range(grid):
            block = instances[y * size:(y + 1) * size, x * size:(x + 1) * size].ravel()
            labels, counts = np.unique(block, return_counts=True)
            winner = labels[np.argmax(counts)]
            expected = "background" if winner == 0 else \
                f"{SCENE.objects[winner - 1].color} {SCENE.objects[winner - 1].shape}"
            assert CELL_LABELS[cells[y, x]] == expected, (y, x)
    assert CELL_LABELS[cells[1, 1]] == "red circle" and (cells == 0).sum() > 0


def test_pretraining_loss_and_evaluation_run_on_the_heads():
    torch.manual_seed(0)
    net = SceneResNet((4, 4, 8, 8), 64, NUM_LABELS, NUM_CELL_LABELS)
    presence, counts = (torch.from_numpy(t)[None] for t in scene_targets(SCENE))
    cells = torch.from_numpy(cell_targets(instance_map(SCENE), SCENE, 4))[None]
    images = torch.randn(1, 3, 64, 64)
    loss = pretraining_loss(net, images, presence, counts, cells)
    loss.backward()
    assert torch.isfinite(loss) and net.cell_classifier.weight.grad.abs().sum() > 0
    metrics = evaluate(net, images, presence, counts, cells)
    assert set(metrics) == {"presence_label_acc", "pair_presence_acc", "count_acc", "cell_acc"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_fc_layers_train_on_the_frozen_trunk_and_leave_it_unchanged():
    """fc6-fc7 are pretrained second (pretrain_fc): the trunk's weights, and so the grid every
    other model reads, stay as they were; the fc classifier learns the image-level targets."""
    from pipeline.models.pretraining import pretrain, pretrain_fc
    torch.manual_seed(0)
    with_fc = SceneResNet((4, 4, 8, 8), 64, NUM_LABELS, NUM_CELL_LABELS, fc=(16, 12))
    torch.manual_seed(0)
    without = SceneResNet((4, 4, 8, 8), 64, NUM_LABELS, NUM_CELL_LABELS)
    # Same initial trunk with or without fc layers (they are created after every convolution).
    trunk = {k: v for k, v in with_fc.state_dict().items() if not k.startswith("fc")}
    assert all(torch.equal(v, without.state_dict()[k]) for k, v in trunk.items())
    presence, counts = (torch.from_numpy(t)[None].repeat(8, 1) for t in scene_targets(SCENE))
    cells = torch.from_numpy(cell_targets(instance_map(SCENE), SCENE, 4))[None].repeat(8, 1, 1)
    data = (torch.randn(8, 3, 64, 64), presence, counts, cells)
    pretrain(with_fc, data, data, epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0)
    before = {k: v.clone() for k, v in with_fc.state_dict().items() if not k.startswith("fc")}
    fc_before = with_fc.fc[1].weight.clone()
    history = pretrain_fc(with_fc, data, data, epochs=3, batch_size=4, lr=1e-2, weight_decay=0.0, seed=1)
    after = with_fc.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # BN statistics included
    assert not torch.equal(fc_before, with_fc.fc[1].weight)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[-1]) == {"fc_presence_label_acc", "fc_pair_presence_acc", "fc_count_acc", "epoch"}
    assert not with_fc.fc.training  # dropout off once pretrained


def test_run_returns_the_metrics_it_writes_for_resnet152(tmp_path):
    """resnet152 has nothing to pretrain: ``run`` returns the record it writes, a dict (as on
    the pretraining branch), not the file's path."""
    import json

    from pipeline import pretrain_backbone
    from pipeline.common.config import compose

    weights = tmp_path / "resnet152.pth"
    weights.write_bytes(b"not read")
    cfg = compose([f"paths.root={tmp_path}", "backbone=resnet152", f"backbone.weights={weights}"])
    metrics = pretrain_backbone.run(cfg)
    assert metrics == {"backbone": "resnet152", "weights": str(weights)}
    assert json.loads((tmp_path / "reports" / "metrics" / "pretrain_backbone.json").read_text()) == metrics
