#!/usr/bin/env node
// Send events to a Nakama-compatible `POST /v2/event` endpoint through the
// real @heroiclabs/nakama-js client and print one JSON summary on stdout.
//
// Usage:
//   node tests/js/emit.mjs --host 127.0.0.1 --port 7350 --token JWT --count 1000 \
//     [--concurrency 16] [--name NAME] [--server-key defaultkey] [--timestamp] \
//     [--timeout-ms 7000]
//
// Output: {"sent", "ok", "failed", "statuses", "run", "errors"}. The keys of
// `statuses` are HTTP status codes as strings, plus "timeout" when the
// client's own timer fired, "invalid_json" when a 2xx reply had a body that
// is not JSON, and "network" when fetch itself rejected (for example
// connection refused). The exit code is 0 whenever the calls were
// made, even if some failed, and 2 for an invalid option or token.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { Client, Session } from "@heroiclabs/nakama-js";

const MAX_REPORTED_ERRORS = 5;

// nakama-js 2.8.0 rejects with this string when its timer wins the race
// against fetch (`Promise.race` in the package's api.gen.ts).
const CLIENT_TIMEOUT_MESSAGE = "Request timed out.";

const USAGE =
  "usage: node tests/js/emit.mjs --host HOST --port PORT --token JWT --count N " +
  "[--concurrency N] [--name NAME] [--server-key KEY] [--timestamp] [--timeout-ms MS]";

function exitWithUsageError(message) {
  process.stderr.write(`emit.mjs: ${message}\n${USAGE}\n`);
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
        count: { type: "string" },
        concurrency: { type: "string", default: "16" },
        name: { type: "string", default: "nakama_js_event" },
        "server-key": { type: "string", default: "defaultkey" },
        timestamp: { type: "boolean", default: false },
        "timeout-ms": { type: "string", default: "7000" },
      },
    });
  } catch (error) {
    exitWithUsageError(error.message);
  }

  const values = parsed.values;
  for (const required of ["host", "port", "token", "count"]) {
    if (values[required] === undefined || values[required] === "") {
      exitWithUsageError(`missing required option --${required}`);
    }
  }

  return {
    host: values.host,
    port: parseInteger("port", values.port, 1, 65535),
    token: values.token,
    count: parseInteger("count", values.count, 0, 10_000_000),
    concurrency: parseInteger("concurrency", values.concurrency, 1, 10_000),
    name: values.name,
    serverKey: values["server-key"],
    sendTimestamp: values.timestamp,
    timeoutMs: parseInteger("timeout-ms", values["timeout-ms"], 1, 3_600_000),
  };
}

function readClientVersion() {
  const manifestUrl = new URL(
    "./node_modules/@heroiclabs/nakama-js/package.json",
    import.meta.url,
  );
  return JSON.parse(readFileSync(manifestUrl, "utf8")).version;
}

// Session.restore decodes the JWT payload to read `exp`, `uid` and `usn`, and
// throws a plain string (not an Error) when the token is not three
// dot-separated parts or the payload is not base64 JSON.
function restoreSession(token) {
  try {
    return Session.restore(token, "");
  } catch (error) {
    exitWithUsageError(`invalid --token: Session.restore failed: ${String(error)}`);
  }
}

// Classify one rejection from client.emitEvent. nakama-js 2.8.0 throws the
// fetch Response itself for any status outside 2xx (204 counts as success),
// rejects with a string on its own timeout, and passes through the errors of
// fetch and response.json().
async function describeFailure(error) {
  const isResponse =
    error instanceof Response ||
    (typeof error?.status === "number" && typeof error?.text === "function");
  if (isResponse) {
    let body = "";
    try {
      body = await error.text();
    } catch (readError) {
      body = `<body not readable: ${readError.message}>`;
    }
    return {
      statusKey: String(error.status),
      message: `HTTP ${error.status} ${error.statusText}: ${body}`,
    };
  }

  if (error === CLIENT_TIMEOUT_MESSAGE) {
    return { statusKey: "timeout", message: CLIENT_TIMEOUT_MESSAGE };
  }

  // A 2xx response whose body is not JSON (an empty 200 included) makes the
  // client's response.json() reject, so the call fails although the server
  // accepted it.
  if (error instanceof SyntaxError) {
    return { statusKey: "invalid_json", message: `response body is not JSON: ${error.message}` };
  }

  if (error instanceof Error) {
    // Node's fetch puts the system error, such as ECONNREFUSED, in `cause`.
    let cause = "";
    if (error.cause) {
      cause = ` (${error.cause.code ?? error.cause.message ?? error.cause})`;
    }
    return { statusKey: "network", message: `${error.name}: ${error.message}${cause}` };
  }

  return { statusKey: "network", message: String(error) };
}

async function emitEvents(options) {
  // The sixth argument disables auto refresh. With an empty refresh token the
  // client would skip refreshing anyway, so this is a second guard.
  const client = new Client(
    options.serverKey,
    options.host,
    String(options.port),
    false,
    options.timeoutMs,
    false,
  );
  const session = restoreSession(options.token);
  const runId = randomUUID();
  const clientVersion = readClientVersion();

  const summary = { sent: 0, ok: 0, failed: 0, statuses: {}, run: runId, errors: [] };
  let nextSeq = 0;

  async function sendOne(seq) {
    const request = {
      name: options.name,
      properties: {
        seq: String(seq),
        run: runId,
        client: "nakama-js",
        client_version: clientVersion,
      },
    };
    if (options.sendTimestamp) {
      request.timestamp = new Date().toISOString();
    }

    summary.sent += 1;
    try {
      await client.emitEvent(session, request);
      summary.ok += 1;
    } catch (error) {
      const failure = await describeFailure(error);
      summary.failed += 1;
      summary.statuses[failure.statusKey] = (summary.statuses[failure.statusKey] ?? 0) + 1;
      if (summary.errors.length < MAX_REPORTED_ERRORS) {
        summary.errors.push(`event seq=${seq}: ${failure.message}`);
      }
    }
  }

  async function runWorker() {
    while (nextSeq < options.count) {
      const seq = nextSeq;
      nextSeq += 1;
      await sendOne(seq);
    }
  }

  const workerCount = Math.min(options.concurrency, options.count);
  await Promise.all(Array.from({ length: workerCount }, runWorker));
  return summary;
}

const summary = await emitEvents(parseOptions(process.argv.slice(2)));

// Each nakama-js call leaves its timeout timer armed after fetch settles, so
// the process would stay alive for up to --timeout-ms. Exit once stdout is
// flushed instead of waiting for those timers.
process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(0));
