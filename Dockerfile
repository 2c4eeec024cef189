# The image the KubeRay manifests name (kubernetes.image, default expertpool:<project version>): Ray 2.60
# with this repository installed, the repository root as working directory (cluster.yaml and data/ for
# the demo job). Built from the project's own files only; tests/platform/test_kuberay.py checks that
# every path copied here exists and is not excluded by .dockerignore.
#
#   docker build -t registry.example.com/expertpool:0.1.0 .
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu -t registry.example.com/expertpool:0.1.0-gpu .
#
# CPU actors build the CPU kernels (routed experts, decode attention) with cc at start (expertpool/kernels/csrc); DeepSpeed JIT-compiles
# a small C++ op (g++ and ninja): both are present in the Ray images. Set
# DS_BUILD_SHM_COMM=1 below to build DeepSpeed's op here instead.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
WORKDIR /home/ray/expertpool
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray expertpool ./expertpool
RUN pip install --no-cache-dir .
COPY --chown=ray cluster.yaml ./
COPY --chown=ray data ./data
