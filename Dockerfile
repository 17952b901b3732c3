# pg-maintainer: the daemon image. `docker run IMAGE` starts `maintainer run`; any other command
# works too (`docker run IMAGE trigger sequences`). Runs as a non-root user and writes nothing to
# its root filesystem, so it runs under readOnlyRootFilesystem.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY maintainer/ maintainer/
COPY templates/ templates/
COPY jobs/ jobs/
# Bytecode is compiled here, at build time: the running container cannot write it.
RUN /opt/venv/bin/pip install --no-cache-dir --compile .

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MAINTAINER_CONFIG=/etc/maintainer/maintainer.yaml
RUN groupadd --system --gid 10001 maintainer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin maintainer
COPY --from=build /opt/venv /opt/venv
WORKDIR /etc/maintainer
USER 10001:10001
EXPOSE 9188
# No curl in a slim image: the interpreter does the probe. Keep the port in step with http.listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9188/healthz', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["maintainer"]
CMD ["run"]
