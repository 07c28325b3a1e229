'use strict';
// Registers one device with the official, unmodified Azure IoT Node.js provisioning SDK
// (azure-iot-provisioning-device with its AMQP, AMQP-over-WebSockets, MQTT or HTTP transport) and prints
// one JSON line: {"ok": true, "ms": N, "result": <the SDK's RegistrationResult>} or
// {"ok": false, "ms": N, "error": "...", "name": "...", "statusCode": N}.
//
//   node register.js '<spec JSON>'
//
// spec: {"transport": "amqp" | "amqp-ws" | "mqtt" | "mqtt-ws" | "https", "host": the provisioning
// host the SDK dials (amqps://host, wss://host:443, mqtts://host:8883, https://host), "address": the IP address that name
// stands for in this process only (the conformance suite's own loopback address), "idScope",
// "registrationId", and either "symmetricKey" or "certFile" + "keyFile" (PEM, the certificate file
// holding the device certificate and its chain); optional "payload" (any JSON).
// The server's CA comes from NODE_EXTRA_CA_CERTS, set by the caller.

const dns = require('dns');
const fs = require('fs');

const spec = JSON.parse(process.argv[2]);

// The suite's host names resolve nowhere; route that one name to the suite's address, as a hosts
// file would. Every socket Node opens (TLS for AMQP and MQTT, HTTPS for the WebSocket upgrade)
// resolves through dns.lookup, and TLS still checks the name against the server's certificate.
const realLookup = dns.lookup;
dns.lookup = function (hostname, options, callback) {
  if (typeof hostname === 'string' && hostname.toLowerCase() === spec.host.toLowerCase()) {
    hostname = spec.address;
  }
  return realLookup.call(dns, hostname, options, callback);
};

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');

function transport() {
  switch (spec.transport) {
    case 'amqp':
      return new (require('azure-iot-provisioning-device-amqp').Amqp)();
    case 'amqp-ws':
      return new (require('azure-iot-provisioning-device-amqp').AmqpWs)();
    case 'mqtt':
      return new (require('azure-iot-provisioning-device-mqtt').Mqtt)();
    case 'mqtt-ws':
      return new (require('azure-iot-provisioning-device-mqtt').MqttWs)();
    case 'https':
      return new (require('azure-iot-provisioning-device-http').Http)();
    default:
      throw new Error(`unknown transport ${spec.transport}`);
  }
}

function security() {
  if (spec.symmetricKey) {
    const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
    return new SymmetricKeySecurityClient(spec.registrationId, spec.symmetricKey);
  }
  const { X509Security } = require('azure-iot-security-x509');
  return new X509Security(spec.registrationId, {
    cert: fs.readFileSync(spec.certFile, 'utf8'),
    key: fs.readFileSync(spec.keyFile, 'utf8'),
  });
}

const started = Date.now();
const client = ProvisioningDeviceClient.create(spec.host, spec.idScope, transport(), security());
if (spec.payload !== undefined) {
  client.setProvisioningPayload(spec.payload);
}

// A failing exchange must end by itself; this only keeps a hung one from hanging the suite.
const guard = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, ms: Date.now() - started, error: 'no answer within 30 s', name: 'Timeout' }));
  process.exit(1);
}, 30000);

// What an error says, whatever its kind: the SDK's own errors carry a message, and for some
// failures the service's error JSON in `result`; a delivery that AMQP rejected reaches the caller as
// the AMQP error itself (rhea's decoded `error`, with `condition` and `description`).
function describe(err) {
  const seen = { name: err.name, error: err.message ? String(err.message) : undefined };
  if (err.condition !== undefined) {
    seen.condition = String(err.condition);
    seen.description = err.description === undefined ? undefined : String(err.description);
  }
  if (err.result !== undefined) {
    seen.result = err.result;
  }
  const status = err.transportObject?.statusCode ?? err.response?.statusCode ?? err.statusCode;
  if (status !== undefined) {
    seen.statusCode = status;
  }
  return seen;
}

client.register((err, result) => {
  clearTimeout(guard);
  const ms = Date.now() - started;
  console.log(JSON.stringify(err ? { ok: false, ms, ...describe(err) } : { ok: true, ms, result }));
  // The SDK leaves nothing open after register(); exit at once all the same.
  process.exit(0);
});
