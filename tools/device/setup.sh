# Source this on a lent GPU machine (benchmarks/README.md, "On a GPU"): it installs the pure-Python
# dependencies the image lacks from wheels carried in .whl/ and the Fashion-MNIST files carried in
# .fmnist/, then puts the checkout on PYTHONPATH (the image's torch is used as is).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets && ln -sfn "$PWD/.fmnist" /usr/share/datasets/fashion-mnist
