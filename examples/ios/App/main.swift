import CoreML
import Foundation

// The package slmc built is a resource of this module: Bundle.module/chat-coreml/model.mlpackage
let url = Bundle.module.url(forResource: "model", withExtension: "mlpackage", subdirectory: "chat-coreml")!
let compiled = try MLModel.compileModel(at: url)
let model = try MLModel(contentsOf: compiled)
print(model.modelDescription)
