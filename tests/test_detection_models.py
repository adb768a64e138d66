"""Faster R-CNN builders and the box-head distillation glue (mdistiller/detection/models.py, rcnn_distill.py).

Offline, CPU, random weights, two 128x128 images; expectations computed independently here (torchvision's own
forward, F.cross_entropy, the KL / DKD / dino definitions written out)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mdistiller.detection.models import (BACKGROUND, NUM_CLASSES, build_faster_rcnn, class_means_from_detectron2,
                                         coco91_state_dict_to_contiguous,
                                         detectron2_to_torchvision_labels, torchvision_to_detectron2_labels)
from mdistiller.detection.rcnn_distill import (BoxFeatureClassMeans, RCNNDistillGlue, detector_task_terms, dkd_term,
                                               kd_term, dino_term)
from mdistiller.utils.errors import ConfigError

SMALL = dict(min_size=128, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             box_batch_size_per_image=32, rpn_batch_size_per_image=64)


def _model(backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    return build_faster_rcnn(backbone, **{**SMALL, **kw})


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10., 12., 60., 70.], [70., 20., 120., 90.]]), "labels": torch.tensor([3, 17])},
               {"boxes": torch.tensor([[30., 30., 100., 110.]]), "labels": torch.tensor([80])}]
    return images, targets


def _glue(teacher_seed=1, student_backbone="resnet18", teacher_backbone="resnet18"):
    return RCNNDistillGlue(_model(student_backbone, 0), _model(teacher_backbone, teacher_seed)).train()


def test_builders_backbones_classes_and_frozen_bn():
    from torchvision.ops import FrozenBatchNorm2d
    for backbone in ("resnet18", "mobilenet_v2"):
        m = _model(backbone)
        assert m.roi_heads.box_predictor.cls_score.out_features == 81
        assert m.roi_heads.box_head.fc7.out_features == 1024
        norms = [x for x in m.backbone.body.modules() if "BatchNorm" in type(x).__name__]
        assert norms and all(isinstance(x, FrozenBatchNorm2d) for x in norms)
        feats = m.backbone(torch.rand(1, 3, 128, 128))
        # FPN: strides 4, 8, 16, 32 and the max-pool level, 256 channels each
        assert [tuple(v.shape[-2:]) for v in feats.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
        assert all(v.shape[1] == 256 for v in feats.values())
    r18 = _model("resnet18")
    # Detectron2's FREEZE_AT 2: stem and layer1 frozen, layer2..4 trained
    assert not any(p.requires_grad for p in r18.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in r18.backbone.body.layer2.parameters())
    assert all(p.requires_grad for p in _model("mobilenet_v2").backbone.body.parameters())  # MV2 FREEZE_AT 0


def test_builder_rejects_bad_input():
    with pytest.raises(ConfigError, match="resnet18, resnet50, resnet101, mobilenet_v2"):
        build_faster_rcnn("vgg16")
    with pytest.raises(ConfigError, match="background"):
        build_faster_rcnn("resnet18", num_classes=1)
    with pytest.raises(ConfigError, match="same label set"):
        RCNNDistillGlue(_model(), _model(num_classes=91))


def test_label_mapping_detectron2():
    d2 = torch.tensor([0, 5, 79, 80])  # Detectron2: 80 is background
    ours = detectron2_to_torchvision_labels(d2)
    assert ours.tolist() == [1, 6, 80, BACKGROUND]
    assert torchvision_to_detectron2_labels(ours).tolist() == d2.tolist()
    means_d2 = torch.arange(NUM_CLASSES, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row k holds k
    ours_means = class_means_from_detectron2(means_d2)
    for d2_label in (0, 41, 79, 80):
        ours_label = int(detectron2_to_torchvision_labels(torch.tensor(d2_label)))
        assert ours_means[ours_label].tolist() == [float(d2_label)] * 3


def test_exposed_logits_and_labels_are_what_the_detector_trains_on():
    student = _model()
    glue = RCNNDistillGlue(student, _model(seed=1)).train()
    images, targets = _batch()
    torch.manual_seed(5)
    step = glue(images, targets)
    # torchvision's own training forward with the same sampler draws gives the same four losses
    torch.manual_seed(5)
    reference = student(images, targets)
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(step.losses[name], reference[name])
    torch.testing.assert_close(F.cross_entropy(step.student_logits, step.labels), reference["loss_classifier"])
    n = sum(len(p) for p in step.proposals)
    assert step.student_logits.shape == (n, 81) and step.student_features.shape == (n, 1024)
    assert step.labels.shape == (n,) and set(step.labels.tolist()) <= {0, 3, 17, 80}
    assert (step.labels == 0).any() and (step.labels > 0).any()  # the sampler keeps both kinds


def test_teacher_on_student_proposals_without_grad():
    glue = _glue()
    images, targets = _batch()
    step = glue(images, targets)
    n = sum(len(p) for p in step.proposals)
    assert step.teacher_logits.shape == (n, 81) and step.teacher_features.shape == (n, 1024)
    assert not step.teacher_logits.requires_grad and not step.teacher_features.requires_grad
    assert not glue.teacher.training and glue.student.training
    # independently: the teacher's RoIAlign on the same boxes, run by hand on the transformed image tensor
    t = glue.teacher
    image_list, _ = glue.student.transform(images, None)
    with torch.no_grad():
        pooled = t.roi_heads.box_roi_pool(t.backbone(image_list.tensors), step.proposals, image_list.image_sizes)
        fc6 = F.relu(t.roi_heads.box_head.fc6(pooled.flatten(1)))
        feats = F.relu(t.roi_heads.box_head.fc7(fc6))
        logits = feats @ t.roi_heads.box_predictor.cls_score.weight.T + t.roi_heads.box_predictor.cls_score.bias
    torch.testing.assert_close(step.teacher_features, feats)
    torch.testing.assert_close(step.teacher_logits, logits)
    kd_term(step).value.backward()
    assert all(p.grad is None for p in glue.teacher.parameters())
    s = glue.student
    for param in (s.roi_heads.box_head.fc6.weight, s.backbone.fpn.layer_blocks[0][0].weight,
                  s.backbone.body.layer4[0].conv1.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert s.roi_heads.box_predictor.bbox_pred.weight.grad is None  # KD reads only the class logits


def test_kd_with_identical_teacher_is_zero():
    student = _model()
    glue = RCNNDistillGlue(student, copy.deepcopy(student)).train()
    step = glue(*_batch())
    torch.testing.assert_close(step.teacher_logits, step.student_logits.detach())
    assert abs(kd_term(step).value.item()) < 1e-6
    assert abs(dkd_term(step).value.item()) < 1e-6


def test_loss_values_match_their_definitions():
    step = _glue()(*_batch())
    zs, zt, y = step.student_logits.detach().double(), step.teacher_logits.double(), step.labels
    ps, pt = zs.softmax(1), zt.softmax(1)
    kd = (pt * (pt.log() - ps.log())).sum(1).mean()
    assert kd_term(step).value.item() == pytest.approx(kd.item(), rel=1e-4)
    # DKD written out: binary target/non-target KL + beta * KL among the non-target classes
    mask = F.one_hot(y, 81).bool()
    bt = torch.stack([pt[mask], 1 - pt[mask]], 1)
    bs = torch.stack([ps[mask], 1 - ps[mask]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean()
    pt_hat = pt[~mask].view(-1, 80) / pt[~mask].view(-1, 80).sum(1, keepdim=True)
    ps_hat = ps[~mask].view(-1, 80) / ps[~mask].view(-1, 80).sum(1, keepdim=True)
    nckd = (pt_hat * (pt_hat.log() - ps_hat.log())).sum(1).mean()
    assert dkd_term(step).value.item() == pytest.approx((tckd + 0.25 * nckd).item(), rel=1e-4)
    # ND: 1 - f_s . e_y / max(|f_s|, |f_t|)
    means = torch.randn(81, 1024)
    fs, ft = step.student_features.detach(), step.teacher_features
    e = means[y] / means[y].norm(dim=1, keepdim=True)
    nd = (1 - (fs * e).sum(1) / torch.maximum(fs.norm(dim=1), ft.norm(dim=1))).mean()
    assert dino_term(step, means, weight=1.5).value.item() == pytest.approx(1.5 * nd.item(), rel=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        dino_term(step, torch.zeros(80, 1024))


def test_class_means_accumulator():
    step = _glue()(*_batch())
    acc = BoxFeatureClassMeans(81, 1024)
    acc.update(step)
    acc.update(step)
    means = acc.means(decimals=-1)
    for label in step.labels.unique().tolist():
        want = step.teacher_features[step.labels == label].double().mean(0).float()
        torch.testing.assert_close(means[label], want)
    assert means[1].abs().sum() == 0 and int(acc.counts.sum()) == 2 * len(step.labels)
    rounded = acc.means(4).double() * 1e4  # 4 decimals, as KD++'s class-mean files
    assert torch.allclose(rounded, rounded.round(), atol=1e-2) and torch.allclose(acc.means(4), means, atol=5.1e-5)


@pytest.mark.parametrize("method", ["kd", "dkd", "kdpp"])
def test_one_training_iteration(method):
    glue = _glue()
    images, targets = _batch()
    means = None
    if method == "kdpp":
        acc = BoxFeatureClassMeans(81, 1024)
        with torch.no_grad():
            acc.update(glue(images, targets))
        means = acc.means()
    params = [p for p in glue.student.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in glue.student.named_parameters() if p.requires_grad}
    teacher_before = copy.deepcopy(glue.teacher.state_dict())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    step = glue(images, targets)
    terms = detector_task_terms(step)
    if method == "kd":
        terms["kd"] = kd_term(step)
    elif method == "dkd":
        terms["dkd"] = dkd_term(step)
    else:  # KD++ detection: loss_ndkd = ND + KD, R101->R18 ND weight 1.5
        terms["ndkd"] = kd_term(step)
        terms["dino"] = dino_term(step, means, weight=1.5)
    total = sum(t.value for t in terms.values())
    assert all(torch.isfinite(t.value) for t in terms.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    moved = [n for n, p in glue.student.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("box_head" in n for n in moved) and any("backbone.body" in n for n in moved)
    assert any("rpn" in n for n in moved)
    for k, v in glue.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_mobilenet_student_resnet_teacher():
    glue = _glue(student_backbone="mobilenet_v2", teacher_backbone="resnet18")
    step = glue(*_batch())
    assert step.teacher_features.shape == step.student_features.shape
    dkd_term(step).value.backward()
    assert glue.student.backbone.body["17"].conv[0][0].weight.grad is not None


def test_glue_refuses_eval_mode():
    glue = _glue().eval()
    with pytest.raises(RuntimeError, match="train"):
        glue(*_batch())


def test_resnet50_is_torchvision_fasterrcnn_resnet50_fpn():
    """Same parameters (names and shapes) as torchvision's own builder, so its COCO checkpoint loads."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    ours = build_faster_rcnn("resnet50", num_classes=91).state_dict()
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}  # their BN is not frozen
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_resnet101_backbone_is_torchvision_resnet101():
    from torchvision.models import resnet101
    body = build_faster_rcnn("resnet101").backbone.body.state_dict()
    reference = {k: tuple(v.shape) for k, v in resnet101().state_dict().items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in body.items()} == reference


def test_coco91_checkpoint_to_contiguous_labels():
    m91 = _model(num_classes=91)
    category_ids = [1, 2, 13, 90]  # three of COCO's ids with a gap, as a 4-category dataset would have them
    m5 = _model(num_classes=5)
    m5.load_state_dict(coco91_state_dict_to_contiguous(m91.state_dict(), category_ids))
    x = torch.randn(6, 1024)
    with torch.no_grad():
        logits91, boxes91 = m91.roi_heads.box_predictor(x)
        logits5, boxes5 = m5.roi_heads.box_predictor(x)
    keep = [0, 1, 2, 13, 90]
    torch.testing.assert_close(logits5, logits91[:, keep])
    torch.testing.assert_close(boxes5.view(6, 5, 4), boxes91.view(6, 91, 4)[:, keep])
    with pytest.raises(ValueError, match="sorted"):
        coco91_state_dict_to_contiguous(m91.state_dict(), [13, 2])
    with pytest.raises(ValueError, match="no row"):
        coco91_state_dict_to_contiguous(m91.state_dict(), [1, 91])


def test_image_without_boxes():
    """COCO has images without annotations: all their proposals are background, the losses stay finite."""
    student = _model()
    glue = RCNNDistillGlue(student, _model(seed=1)).train()
    images, targets = _batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    torch.manual_seed(2)
    step = glue(images, targets)
    torch.manual_seed(2)
    reference = student(images, targets)
    torch.testing.assert_close(F.cross_entropy(step.student_logits, step.labels), reference["loss_classifier"])
    second = step.labels[len(step.proposals[0]):]
    assert len(second) > 0 and (second == BACKGROUND).all()
    assert all(torch.isfinite(v) for v in step.losses.values())
    assert torch.isfinite(dkd_term(step).value) and torch.isfinite(kd_term(step).value)


def test_degenerate_box_is_refused():
    glue = _glue()
    images, targets = _batch()
    targets[0]["boxes"][1] = torch.tensor([70., 20., 70., 90.])
    with pytest.raises(ValueError, match="image 0 has a box with zero or negative width"):
        glue(images, targets)


def test_teacher_with_other_normalisation_sees_its_own_input():
    """A teacher normalising differently (here Detectron2-zoo style: BGR, 0-255 means, std 1) gets the student's
    batch in its own normalisation, equal to its own transform of the same images; padding stays zero."""
    from mdistiller.detection.rcnn_distill import teacher_input
    student = _model()
    teacher = _model(seed=1, image_mean=[103.53 / 255, 116.28 / 255, 123.675 / 255], image_std=[1 / 255] * 3)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, 96, generator=g), torch.rand(3, 96, 128, generator=g)]  # padded to 128x128
    student.eval(), teacher.eval()
    with torch.no_grad():
        s_list, _ = student.transform(images)
        t_list, _ = teacher.transform([im.flip(0) for im in images])  # what a BGR teacher is given
        mapped = teacher_input(s_list, student.transform, teacher.transform, flip_channels=True)
    assert s_list.image_sizes == t_list.image_sizes
    torch.testing.assert_close(mapped, t_list.tensors, rtol=1e-5, atol=1e-3)  # 0-255 scale
    glue = RCNNDistillGlue(student, teacher, teacher_flip_channels=True).train()
    step = glue(images, [{"boxes": torch.tensor([[5., 5., 60., 80.]]), "labels": torch.tensor([2])}] * 2)
    with torch.no_grad():
        pooled = teacher.roi_heads.box_roi_pool(teacher.backbone(t_list.tensors), step.proposals, t_list.image_sizes)
        want = teacher.roi_heads.box_head(pooled)
    scale = want.abs().max().item()  # the inputs are on a 0-255 scale: float rounding scales with them
    torch.testing.assert_close(step.teacher_features, want, rtol=1e-4, atol=1e-4 * scale)
    with torch.no_grad():  # the check discriminates: the student's tensor as such gives other features
        pooled = teacher.roi_heads.box_roi_pool(teacher.backbone(s_list.tensors), step.proposals, s_list.image_sizes)
        unmapped = teacher.roi_heads.box_head(pooled)
    assert (unmapped - want).abs().max() > 100 * 1e-4 * scale


def test_distiller_state_of_the_older_layout_loads():
    """Checkpoints whose ReviewKD fusion and dino class means were attributes of the distiller ("review.*",
    "class_means") load into the terms' modules; the terms are summed in their registration order whatever order
    they are given in."""
    from mdistiller.detection.method import DetectionDistiller
    from mdistiller.detection.terms import BoxDino, FPNReviewKD

    def make():
        torch.manual_seed(0)
        return DetectionDistiller(student=build_faster_rcnn("resnet18"), teacher=build_faster_rcnn("resnet18"),
                                  terms={"reviewkd": FPNReviewKD(weight=1.0), "dino": BoxDino(weight=1.0)})

    saved = make()
    assert list(saved.terms) == ["dino", "reviewkd"]
    saved.terms["dino"].class_means.uniform_()
    with torch.no_grad():
        for p in saved.terms["reviewkd"].parameters():
            p.add_(1.0)
    old = {}
    for key, value in saved.learnable_state_dict().items():
        key = key.replace("terms.dino.class_means", "class_means").replace("terms.reviewkd.review.", "review.")
        old[key] = value
    assert "class_means" in old and any(k.startswith("review.") for k in old)
    fresh = make()
    fresh.load_learnable_state_dict(old)
    assert all(torch.equal(v, saved.learnable_state_dict()[k]) for k, v in fresh.learnable_state_dict().items())
