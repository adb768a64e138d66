#!/usr/bin/env bash
# Make Fashion-MNIST (the offline default dataset) available.
# Prefers Debian's dataset-fashion-mnist package (installed with apt-get when we are root), else lets
# torchvision download it into data/ on first use (needs internet).
set -euo pipefail
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "[data] Fashion-MNIST found in $DEB_DIR"
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[data] installing Debian package dataset-fashion-mnist"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/tmp/mdistiller-apt.log 2>&1; then
        echo "[data] Fashion-MNIST installed in $DEB_DIR"
        exit 0
    fi
    echo "[data] apt-get failed (log: /tmp/mdistiller-apt.log); falling back to torchvision's download"
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/.venv/bin/python" -c "import torchvision; torchvision.datasets.FashionMNIST('$ROOT/data', train=True, download=True); torchvision.datasets.FashionMNIST('$ROOT/data', train=False, download=True)" \
    || { echo "[data] could not get Fashion-MNIST: install dataset-fashion-mnist or put the four idx .gz files in data/FashionMNIST/raw/" >&2; exit 1; }
