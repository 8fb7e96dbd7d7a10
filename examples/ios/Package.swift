// swift-tools-version:5.9
// A SwiftPM app target whose models slmc builds (slmc.toml in Sources/App/).
import PackageDescription

let package = Package(
    name: "SlmcExample",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.executable(name: "App", targets: ["App"])],
    targets: [
        .plugin(name: "SlmcPlugin", capability: .buildTool(),
                path: "../../integrations/xcode/Plugins/SlmcPlugin"),
        .executableTarget(name: "App", path: "App", plugins: ["SlmcPlugin"]),
    ]
)
