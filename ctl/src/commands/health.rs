//! `health`: the standard gRPC health check, for the whole server or named services.

use serde_json::json;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::{connect::Clients, error::Error, render::Output, table::Table};

/// Prints each service's status; fails unless every one is SERVING.
pub async fn check(clients: &Clients, out: Output, mut services: Vec<String>) -> Result<(), Error> {
    if services.is_empty() {
        services.push(String::new()); // the whole server
    }
    let mut statuses = Vec::new();
    for service in services {
        let answer = clients.health().check(HealthCheckRequest { service: service.clone() }).await;
        let status = match answer {
            Ok(answer) => ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown),
            // The health service's answer for a name it does not know.
            Err(status) if status.code() == tonic::Code::NotFound => ServingStatus::ServiceUnknown,
            Err(status) => return Err(status.into()),
        };
        statuses.push((service, status.as_str_name()));
    }
    let json = json!({
        "services": statuses.iter().map(|(service, status)| json!({"service": service, "status": status}))
            .collect::<Vec<_>>(),
    });
    out.show(json, || {
        let mut table = Table::new(&["SERVICE", "STATUS"]);
        for (service, status) in &statuses {
            let name = if service.is_empty() { "(server)" } else { service };
            table.row(vec![name.to_owned(), status.to_string()]);
        }
        table.render()
    });
    let unhealthy: Vec<_> = statuses.iter().filter(|(_, status)| *status != "SERVING").collect();
    if unhealthy.is_empty() {
        Ok(())
    } else {
        let names: Vec<_> = unhealthy.iter().map(|(service, status)| format!("{service:?} is {status}")).collect();
        Err(Error::Failed(format!("not healthy: {}", names.join(", "))))
    }
}
