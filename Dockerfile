# One image for every role: `ftune api`, `ftune worker`, `ftune up`, `ftune train`.
# The base image is pinned to an exact release tag (Python 3.11, Debian bookworm).
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, exact versions with hashes (Linux x86_64, CUDA torch): a change to the
# code does not download torch again.
COPY requirements.lock requirements-nodeps.lock ./
RUN pip install pip==26.3 \
 && pip install --require-hashes -r requirements.lock \
 && pip install --require-hashes --no-deps -r requirements-nodeps.lock

# Then the project itself, without dependencies (built with the locked setuptools).
COPY pyproject.toml README.md ./
COPY ftune ./ftune
COPY models ./models
COPY service ./service
COPY workers ./workers
# The sources go once installed: a python started in a folder holding ftune/ would import
# that (without models/) instead of the installed package.
RUN pip install --no-deps --no-build-isolation . && cd / && rm -rf /app

# Run as an unprivileged user that owns only the data volume.
RUN useradd --create-home --uid 10001 ftune && mkdir /data && chown ftune:ftune /data
USER ftune
WORKDIR /home/ftune
ENV FTUNE_HOME=/data \
    FTUNE_API_HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["ftune"]
CMD ["up"]
