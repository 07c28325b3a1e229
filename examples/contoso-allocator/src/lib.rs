//! The tutorial's allocation function: devices whose registration id ends in `-contoso-tstrsd-007`
//! go to the linked hub whose name contains `-toasters-`, those ending in `-contoso-hpsd-088` to the
//! `-heatpumps-` hub, each with its division's initial twin; anything else is refused. Messages are
//! the original function's, so its troubleshooting advice applies unchanged.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};

/// The answer to an allocation request: 200 with an AllocationResponse, or 400 with a message.
pub fn allocate(request: &Value) -> Result<Value, String> {
    let Some(registration_id) = request["deviceRuntimeContext"]["registrationId"].as_str() else {
        return Err("Registration ID not provided for the device.".into());
    };
    let Some(hubs) = request["linkedHubs"].as_array() else {
        return Err("No hub group defined for the enrollment.".into());
    };
    let hubs: Vec<&str> = hubs.iter().filter_map(Value::as_str).collect();
    // Like the original's loop, the last matching hub wins.
    let find = |marker: &str| {
        hubs.iter()
            .rev()
            .find(|h| h.contains(marker))
            .map(|h| (*h).to_owned())
    };
    if registration_id.contains("-contoso-tstrsd-007") {
        let hub = find("-toasters-").ok_or("No toasters hub found for the enrollment.")?;
        Ok(json!({
            "iotHubHostName": hub,
            "initialTwin": {
                "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}},
                "tags": {"deviceType": "toaster"},
            },
        }))
    } else if registration_id.contains("-contoso-hpsd-088") {
        let hub = find("-heatpumps-").ok_or("No heat pumps hub found for the enrollment.")?;
        Ok(json!({
            "iotHubHostName": hub,
            "initialTwin": {
                "properties": {"desired": {"state": "on", "temperatureSetting": "65"}},
                "tags": {"deviceType": "heatpump"},
            },
        }))
    } else {
        Err("Unrecognized device registration.".into())
    }
}

/// Where the function's log lines go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// A log line in the shape of the Azure Functions log the tutorial shows.
// The function is a program of its own, outside opendps and its clock seam: it logs wall time.
#[allow(clippy::disallowed_methods)]
fn line(message: &str) -> String {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.3f");
    format!("{now} [Information] {message}")
}

/// `POST /api/HttpTrigger1` (the tutorial's function name) and `POST /api/alloc`, logging to
/// standard output.
pub fn router() -> Router {
    router_with_log(Arc::new(|l: &str| println!("{l}")))
}

/// The same routes, logging each line to `log`.
pub fn router_with_log(log: Log) -> Router {
    let handler = move |body: Bytes| {
        let log = Arc::clone(&log);
        async move { handle(&*log, &body) }
    };
    Router::new()
        .route("/api/HttpTrigger1", post(handler.clone()))
        .route("/api/alloc", post(handler))
}

fn handle(log: &(dyn Fn(&str) + Send + Sync), body: &[u8]) -> impl IntoResponse + use<> {
    log(&line("Contoso allocator processed a request."));
    log(&line("Request.Body:..."));
    log(&line(&String::from_utf8_lossy(body)));
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match allocate(&request) {
        Ok(response) => {
            log(&line("Response"));
            log(&line(&response.to_string()));
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                response.to_string(),
            )
        }
        Err(message) => {
            log(&line(&message));
            (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                message,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    fn request(registration_id: &str) -> Value {
        json!({
            "enrollmentGroup": {"enrollmentGroupId": "contoso-custom-allocated-devices"},
            "deviceRuntimeContext": {"registrationId": registration_id, "symmetricKey": {}},
            "linkedHubs": ["contoso-toasters-hub-1098.azure-devices.net", "contoso-heatpumps-hub-1098.azure-devices.net"],
        })
    }

    #[test]
    fn toasters_and_heat_pumps() {
        let toaster = allocate(&request("breakroom499-contoso-tstrsd-007")).expect("allocated");
        assert_eq!(
            toaster["iotHubHostName"],
            "contoso-toasters-hub-1098.azure-devices.net"
        );
        assert_eq!(toaster["initialTwin"]["tags"]["deviceType"], "toaster");
        assert_eq!(
            toaster["initialTwin"]["properties"]["desired"],
            json!({"state": "ready", "darknessSetting": "medium"})
        );
        let heatpump = allocate(&request("mainbuilding167-contoso-hpsd-088")).expect("allocated");
        assert_eq!(
            heatpump["iotHubHostName"],
            "contoso-heatpumps-hub-1098.azure-devices.net"
        );
        assert_eq!(
            heatpump["initialTwin"]["properties"]["desired"],
            json!({"state": "on", "temperatureSetting": "65"})
        );
    }

    #[test]
    fn the_original_messages() {
        assert_eq!(
            allocate(&request("elevator1-contoso-elvtr-001")),
            Err("Unrecognized device registration.".into())
        );
        assert_eq!(
            allocate(&json!({"linkedHubs": []})),
            Err("Registration ID not provided for the device.".into())
        );
        assert_eq!(
            allocate(&json!({"deviceRuntimeContext": {"registrationId": "x-contoso-tstrsd-007"}})),
            Err("No hub group defined for the enrollment.".into())
        );
        let no_toasters = json!({"deviceRuntimeContext": {"registrationId": "x-contoso-tstrsd-007"}, "linkedHubs": ["a-heatpumps-b"]});
        assert_eq!(
            allocate(&no_toasters),
            Err("No toasters hub found for the enrollment.".into())
        );
        let no_heatpumps = json!({"deviceRuntimeContext": {"registrationId": "x-contoso-hpsd-088"}, "linkedHubs": ["a-toasters-b"]});
        assert_eq!(
            allocate(&no_heatpumps),
            Err("No heat pumps hub found for the enrollment.".into())
        );
    }

    #[tokio::test]
    async fn over_http() {
        let reply = router()
            .oneshot(
                axum::http::Request::post("/api/HttpTrigger1")
                    .body(axum::body::Body::from(
                        request("elevator1-contoso-elvtr-001").to_string(),
                    ))
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(reply.status(), StatusCode::BAD_REQUEST);
        let body = reply.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"Unrecognized device registration.");
    }
}
