"""The published logit-distillation formulas in plain Python, for tests to compare the library's losses with: no
torch, no library code, one row of logits at a time."""

import math
import statistics


def zscore(row, eps=1e-7):
    """(z - mean) / (eps + sample std, n - 1 in the denominator), as the authors' `normalize`
    (sunshangquan/logit-standardization-KD: (logit - mean) / (1e-7 + logit.std(dim=-1)))."""
    m = sum(row) / len(row)
    return [(v - m) / (eps + statistics.stdev(row)) for v in row]


def softmax(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def plain_kd(student_rows, teacher_rows, temperature, standardize=False):
    """Hinton's KD: T^2 * mean over samples of KL(softmax(t / T) || softmax(s / T)); with `standardize`, LSKD: the
    same on z-scored logits."""
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        if standardize:
            s, t = zscore(s), zscore(t)
        total += kl(softmax([v / temperature for v in t]), softmax([v / temperature for v in s]))
    return total / len(student_rows) * temperature**2


def plain_dkd(student_rows, teacher_rows, labels, alpha, beta, temperature, standardize=False):
    """DKD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, batch means, times T^2. TCKD is the KL of the binary
    (target, rest) distributions, NCKD the KL among the non-target classes (the softmax over the other C - 1 logits,
    what DKD's gt-mask trick computes). With `standardize`, on z-scored logits (LSKD's "DKD + ours")."""
    tckd = nckd = 0.0
    for s, t, y in zip(student_rows, teacher_rows, labels):
        if standardize:
            s, t = zscore(s), zscore(t)
        ps = softmax([v / temperature for v in s])
        pt = softmax([v / temperature for v in t])
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        hs = softmax([v / temperature for i, v in enumerate(s) if i != y])
        ht = softmax([v / temperature for i, v in enumerate(t) if i != y])
        nckd += kl(ht, hs)
    n = len(labels)
    return (alpha * tckd / n + beta * nckd / n) * temperature**2
