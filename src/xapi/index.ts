export { XapiError } from './rpc.js';
export { checkXapiSettings, parseXapiUrl, withXapiSession, type XapiConnectOptions, type XapiSession } from './session.js';
export {
  CONTAINER_ACTIONS,
  containerAction,
  deregister,
  fromImage,
  listContainers,
  parseDockerPs,
  register,
  waitMonitoring,
  type ContainerAction,
  type ContainerActionOptions,
  type ContainerActionResult,
  type MonitoredContainer,
  type RegistrationResult,
  type WaitMonitoringOptions,
  type WaitMonitoringResult,
  type XapiVmOptions,
} from './xscontainer.js';
