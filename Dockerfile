# The one image behind every Arks service in manifests/: `python -m extproc`, `python -m ratelimit`
# and `python -m controller` (the manifests set the command). Build and push it, then point the
# kustomize `images:` entry (name ghcr.io/arks-ai/arks) at it:
#
#   docker build -t registry.example.com/arks:0.1.0 . && docker push registry.example.com/arks:0.1.0
#
# Wheels are built in a first stage so the runtime stage has no compiler and no pip cache.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY arks arks
COPY extproc extproc
COPY ratelimit ratelimit
COPY controller controller
COPY launcher launcher
COPY rls_protos rls_protos
# With the `download` extra: the model download Jobs run `hf` / `modelscope` from this image.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[download]"

FROM python:3.11-slim-bookworm
# The services never write to the image: the manifests mount the root filesystem read-only
# and give /tmp as an emptyDir.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "arks[download]" \
    && rm -rf /wheels
# Envoy Gateway runs the image of its rate-limit Deployment as `/bin/ratelimit`, without arguments
# (the settings are upstream's environment variables): the image answers to that name too, with
# upstream's defaults (every port on 0.0.0.0; `python -m ratelimit` keeps to 127.0.0.1).
RUN ln -s /usr/local/bin/ratelimit /bin/ratelimit
# 65532: the non-root uid/gid the manifests' securityContext names.
USER 65532:65532
WORKDIR /tmp
EXPOSE 50051 8081 9101 9102 9103
CMD ["python", "-m", "controller", "--help"]
