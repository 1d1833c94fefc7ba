# jobbroker's image: the broker, the worker agent and the ops CLI (jobctl) on distroless, as a non-root user with
# no shell. Plain Dockerfile syntax, so docker, podman, buildah and kaniko all build it:
#   docker build -t REGISTRY/jobbroker:0.1.0 . && docker push REGISTRY/jobbroker:0.1.0
# README.md (Kubernetes) has the details; broker/tests/helm_chart.rs checks this file against the workspace.

# The toolchain CI uses.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The same release build as CI and the docs: every binary from Cargo.lock, exactly.
RUN cargo build --release --locked -p broker -p worker-agent -p jobctl

# glibc and CA certificates, nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/broker /usr/local/bin/
COPY --from=build /src/target/release/worker-agent /usr/local/bin/
COPY --from=build /src/target/release/jobctl /usr/local/bin/
# distroless's `nonroot` user; the chart's securityContext says the same numbers.
USER 65532:65532
EXPOSE 50051 50052 9464
ENTRYPOINT ["/usr/local/bin/broker"]
CMD ["serve"]
