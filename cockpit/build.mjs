// Builds the Cockpit package into dist/: index.html, manifest.json, vmsnap.js, vmsnap.css and
// the fonts PatternFly's stylesheet names. `npm ci && npm run build` (lab/build-cockpit.sh).
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

const production = process.env.NODE_ENV !== "development";
rmSync("dist", { recursive: true, force: true });
mkdirSync("dist");
await esbuild.build({
    entryPoints: { vmsnap: "src/index.jsx" },
    bundle: true,
    outdir: "dist",
    minify: production,
    sourcemap: false,
    target: ["es2020"],
    jsx: "automatic",
    loader: {
        ".woff": "file",
        ".woff2": "file",
        ".ttf": "file",
        ".eot": "file",
        ".svg": "file",
        ".png": "file",
        ".jpg": "file",
        ".gif": "file",
    },
    assetNames: "assets/[name]-[hash]",
    define: { "process.env.NODE_ENV": production ? '"production"' : '"development"' },
    logLevel: "warning",
});
for (const file of ["index.html", "manifest.json"]) {
    copyFileSync(`src/${file}`, `dist/${file}`);
}
