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

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY local_endpoints.py ./

EXPOSE 80

# /health answers 200 with JSON while the server is up. Python's urllib is
# used because slim images have no curl/wget; it follows ECS_LOCAL_METADATA_PORT
# and ECS_LOCAL_BIND_ADDRESS (set the port with the variable rather than with
# --port, or the healthcheck looks at port 80), never a proxy. It raises on a non-2xx
# answer or no answer, so python exits 1: unhealthy.
HEALTHCHECK --interval=5s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; b = os.environ.get('ECS_LOCAL_BIND_ADDRESS') or '0.0.0.0'; h = '127.0.0.1' if b in ('0.0.0.0', '::') else ('[%s]' % b if ':' in b else b); u.build_opener(u.ProxyHandler({})).open('http://%s:%s/health' % (h, os.environ.get('ECS_LOCAL_METADATA_PORT') or '80'), timeout=3).read()"]

# Exec form: python is PID 1 and receives SIGTERM from `docker stop` directly.
# Arguments given to `docker run IMAGE ...` are appended (e.g. --port 8080).
ENTRYPOINT ["python", "local_endpoints.py"]
