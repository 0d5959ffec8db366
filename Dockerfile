# Amazon ECS Local Container Endpoints (Python re-implementation).
#
# Build:   docker build -t local-endpoints .
# Other base (any image with python + pip on PATH):
#          docker build --build-arg PYTHON_IMAGE=python:3.11-slim -t local-endpoints .
#
# Drop-in for the original image: listens on port 80 inside the container,
# reads AWS profiles from /home/.aws (mount ~/.aws there) and talks to the
# Docker Engine through /var/run/docker.sock (mount the host's socket).
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV HOME=/home \
    ECS_LOCAL_METADATA_PORT=80 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Fault injection (fault/v1 under ECS_AGENT_URI) runs the ECS agent's own command lines in a task's
# network namespace: iptables/ip6tables and tc (iproute2); nsenter comes with util-linux.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 iptables \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY local_endpoints.py ./

EXPOSE 80

# /health answers 200 while the server is up; --health-check asks it, on the port and
# address the same settings give the server (no curl in slim images).
HEALTHCHECK --interval=5s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "local_endpoints.py", "--health-check"]

# Exec form: python is PID 1 and receives SIGTERM from `docker stop` directly.
# Arguments given to `docker run IMAGE ...` are appended (e.g. --port 8080).
ENTRYPOINT ["python", "local_endpoints.py"]
