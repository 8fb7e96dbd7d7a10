// slmc as a SwiftPM build-tool plugin: runs `slmc build --platform ios` before the target builds
// and hands SwiftPM the artifact folders as resources (Bundle.module/<artifact name>/...).
// Package.swift:
//     .plugin(name: "SlmcPlugin", capability: .buildTool())
//     .target(name: "App", resources: [], plugins: ["SlmcPlugin"])
// slmc.toml sits in the target's folder. The plugin sandbox allows writes only under the plugin's
// work folder, so the cache lives there too (--cache). The slmc command is found through
// /usr/bin/env (PATH), or set SLMC to its absolute path in the scheme's environment.
// NOT RUN: no Swift toolchain on the machine this was written on (see integrations/README.md).
import Foundation
import PackagePlugin

@main
struct SlmcPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        guard let source = target as? SourceModuleTarget else { return [] }
        let config = source.directoryURL.appending(path: "slmc.toml")
        guard FileManager.default.fileExists(atPath: config.path) else {
            Diagnostics.error("SlmcPlugin: no slmc.toml in \(source.directoryURL.path)")
            return []
        }
        let work = context.pluginWorkDirectoryURL
        let out = work.appending(path: "resources")
        // A prebuild command runs on every build; `slmc build` itself answers "up to date"
        // in well under a second, and only the out folder's contents become resources.
        return [
            .prebuildCommand(
                displayName: "slmc build --platform ios",
                executable: URL(fileURLWithPath: "/usr/bin/env"),
                arguments: [
                    ProcessInfo.processInfo.environment["SLMC"] ?? "slmc", "build",
                    "--config", config.path, "--platform", "ios",
                    "--out", out.path,
                    "--cache", work.appending(path: "cache").path,
                    "--depfile", work.appending(path: "slmc.d").path,
                ],
                outputFilesDirectory: out)
        ]
    }
}
