# One image for every role: worker, webhooks, simulator, migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY campaign ./campaign
COPY sql ./sql
RUN pip install . \
 && useradd --system --uid 10001 campaign
COPY config.example.toml /etc/campaign/config.toml
COPY simulator.example.toml /etc/campaign/simulator.toml

USER campaign
ENV CAMPAIGN_CONFIG=/etc/campaign/config.toml
ENTRYPOINT ["campaign"]
CMD ["worker"]
