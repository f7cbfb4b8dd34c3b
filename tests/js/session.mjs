#!/usr/bin/env node
// Open a WebSocket session with the real @heroiclabs/nakama-js client, keep it
// open until the router has sent pongs for a number of heartbeat pings, then
// disconnect, and print one JSON summary on stdout.
//
// Usage (Node.js 20 needs the flag for its built-in WebSocket):
//   node --experimental-websocket tests/js/session.mjs --host 127.0.0.1 --port 7350 \
//     --token JWT [--heartbeat-ms 500] [--pongs 2] [--timeout-ms 10000] \
//     [--server-key defaultkey]
//
// Output: {"connected", "pings", "pongs", "heartbeat_timeouts",
// "open_before_disconnect", "close_code", "open_ms", "errors"}. `pongs` counts
// heartbeat pings that the router answered within --heartbeat-ms. The client
// disconnects once `pongs` reaches --pongs, or after --timeout-ms. The exit code
// is 0 whenever the session was attempted, and 2 for an invalid option.

import { parseArgs } from "node:util";

import { Client, Session } from "@heroiclabs/nakama-js";

const USAGE =
  "usage: node --experimental-websocket tests/js/session.mjs --host HOST --port PORT " +
  "--token JWT [--heartbeat-ms MS] [--pongs N] [--timeout-ms MS] [--server-key KEY]";

const POLL_MS = 20;

function exitWithUsageError(message) {
  process.stderr.write(`session.mjs: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function parseInteger(optionName, text, minimum, maximum) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < minimum || value > maximum) {
    exitWithUsageError(
      `invalid --${optionName} ${JSON.stringify(text)}: expected an integer from ${minimum} to ${maximum}`,
    );
  }
  return value;
}

function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      options: {
        host: { type: "string" },
        port: { type: "string" },
        token: { type: "string" },
        "heartbeat-ms": { type: "string", default: "500" },
        pongs: { type: "string", default: "2" },
        "timeout-ms": { type: "string", default: "10000" },
        "server-key": { type: "string", default: "defaultkey" },
      },
    });
  } catch (error) {
    exitWithUsageError(error.message);
  }

  const values = parsed.values;
  for (const required of ["host", "port", "token"]) {
    if (values[required] === undefined || values[required] === "") {
      exitWithUsageError(`missing required option --${required}`);
    }
  }

  return {
    host: values.host,
    port: parseInteger("port", values.port, 1, 65535),
    token: values.token,
    heartbeatMs: parseInteger("heartbeat-ms", values["heartbeat-ms"], 10, 600_000),
    pongs: parseInteger("pongs", values.pongs, 1, 1000),
    timeoutMs: parseInteger("timeout-ms", values["timeout-ms"], 1, 3_600_000),
    serverKey: values["server-key"],
  };
}

function restoreSession(token) {
  try {
    return Session.restore(token, "");
  } catch (error) {
    exitWithUsageError(`invalid --token: Session.restore failed: ${String(error)}`);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitUntil(predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate() && Date.now() < deadline) {
    await sleep(POLL_MS);
  }
  return predicate();
}

async function runSession(options) {
  if (typeof WebSocket === "undefined") {
    exitWithUsageError("no global WebSocket; run Node.js 20 with --experimental-websocket");
  }
  // nakama-js 2.8.0 reads `window.console` when a heartbeat ping times out
  // (DefaultSocket.pingPong), which throws a ReferenceError outside a
  // browser. With `window` defined, a timeout takes the client's own path:
  // onheartbeattimeout, then close.
  globalThis.window ??= globalThis;

  const client = new Client(options.serverKey, options.host, String(options.port), false);
  const session = restoreSession(options.token);
  const socket = client.createSocket(false, false);
  socket.setHeartbeatTimeoutMs(options.heartbeatMs);

  const summary = {
    connected: false,
    pings: 0,
    pongs: 0,
    heartbeat_timeouts: 0,
    open_before_disconnect: false,
    close_code: null,
    open_ms: 0,
    errors: [],
  };

  // DefaultSocket.pingPong calls `this.send({ping: {}}, heartbeatMs)`, which
  // resolves on the router's pong and rejects when none arrives in time. An
  // own property shadows the prototype's `send`, so every ping is counted.
  const originalSend = socket.send.bind(socket);
  socket.send = async (message, sendTimeout) => {
    const isPing = message !== null && typeof message === "object" && "ping" in message;
    if (isPing) {
      summary.pings += 1;
    }
    const reply = await originalSend(message, sendTimeout);
    if (isPing) {
      summary.pongs += 1;
    }
    return reply;
  };
  socket.onheartbeattimeout = () => {
    summary.heartbeat_timeouts += 1;
  };
  let closeEvent = null;
  socket.ondisconnect = (event) => {
    // disconnect() first fires this with an empty object; the adapter's close
    // event, with the close code, follows once the close handshake ends.
    if (event && typeof event.code === "number") {
      closeEvent = event;
    }
  };
  socket.onerror = (event) => {
    summary.errors.push(`socket error: ${event?.message ?? event?.type ?? String(event)}`);
  };

  const openedAt = Date.now();
  try {
    await socket.connect(session, false);
    summary.connected = true;
  } catch (error) {
    summary.errors.push(`connect failed: ${error?.message ?? error?.type ?? String(error)}`);
    return summary;
  }

  const enoughPongs = await waitUntil(
    () => summary.pongs >= options.pongs || closeEvent !== null,
    options.timeoutMs,
  );
  if (!enoughPongs) {
    summary.errors.push(
      `only ${summary.pongs} of ${options.pongs} pongs within ${options.timeoutMs} ms`,
    );
  }
  summary.open_before_disconnect = socket.adapter.isOpen();
  summary.open_ms = Date.now() - openedAt;
  socket.disconnect();

  if (!(await waitUntil(() => closeEvent !== null, options.timeoutMs))) {
    summary.errors.push(`no close event within ${options.timeoutMs} ms of disconnect()`);
  }
  summary.close_code = closeEvent?.code ?? null;
  return summary;
}

const summary = await runSession(parseOptions(process.argv.slice(2)));

// The client leaves a send timer armed per message, so exit once stdout is
// flushed instead of waiting for those timers.
process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(0));
