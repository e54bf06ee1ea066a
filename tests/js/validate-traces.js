#!/usr/bin/env node
// Validates Voiceflow traces against the schemas Voiceflow publishes in the npm package
// @voiceflow/dtos-interact (zod), as a client built on them would.
//
// stdin:  a JSON array of traces ({type, payload?, time?, ...}).
// stdout: one JSON object:
//   {package, version, schemas: {traceType: schemaName},
//    results: [{index, type, schema, ok, issues?}]}
//   schema is the package's *TraceDTO for the trace's type; a type the package has no
//   schema for (e.g. "completion", custom action traces) is checked against the
//   package's BaseTraceDTO with `type` any non-empty string, and named
//   "BaseTraceDTO (no schema for this type)".
// exit:   0 when every trace passes, 1 when one fails (its issues are also on stderr),
//         2 on bad input.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { z } = require('zod');
const dtos = require('@voiceflow/dtos-interact');

const PACKAGE = '@voiceflow/dtos-interact';
const NO_SCHEMA = 'BaseTraceDTO (no schema for this type)';

function packageVersion() {
  // the package's "exports" hides its package.json from require(): read the file
  const main = require.resolve(PACKAGE);
  let dir = path.dirname(main);
  while (!fs.existsSync(path.join(dir, 'package.json')) || dir.endsWith(path.join('build', 'cjs'))) {
    dir = path.dirname(dir);
  }
  return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version;
}

// trace type -> [schema name, schema]: every exported *TraceDTO whose `type` is a literal
function traceSchemas() {
  const out = {};
  for (const [name, schema] of Object.entries(dtos)) {
    if (!name.endsWith('TraceDTO') || name === 'BaseTraceDTO') continue;
    const type = schema && schema.shape && schema.shape.type;
    if (type && type._def && type._def.typeName === 'ZodLiteral') {
      out[type._def.value] = [name, schema];
    }
  }
  return out;
}

function main() {
  let traces;
  try {
    traces = JSON.parse(fs.readFileSync(0, 'utf8'));
  } catch (err) {
    process.stderr.write(`stdin is not JSON: ${err.message}\n`);
    process.exit(2);
  }
  if (!Array.isArray(traces)) {
    process.stderr.write('stdin must be a JSON array of traces\n');
    process.exit(2);
  }
  const schemas = traceSchemas();
  const custom = dtos.BaseTraceDTO.extend({ type: z.string().min(1) });
  const results = traces.map((trace, index) => {
    const type = trace && typeof trace === 'object' ? trace.type : undefined;
    const [name, schema] = schemas[type] || [NO_SCHEMA, custom];
    const parsed = schema.safeParse(trace);
    const result = { index, type, schema: name, ok: parsed.success };
    if (!parsed.success) result.issues = parsed.error.issues;
    return result;
  });
  const report = {
    package: PACKAGE,
    version: packageVersion(),
    schemas: Object.fromEntries(Object.entries(schemas).map(([t, [n]]) => [t, n])),
    results,
  };
  process.stdout.write(JSON.stringify(report) + '\n');
  const failed = results.filter((r) => !r.ok);
  for (const f of failed) {
    process.stderr.write(`trace ${f.index} (${f.type}) fails ${f.schema}: ${JSON.stringify(f.issues)}\n`);
  }
  process.exit(failed.length ? 1 : 0);
}

main();
